"""The crop decision: which detection becomes the crop, and how it is padded.

One home for the box logic that the crop stage (``tasks/crop.py``) and serving
(``serve/``) share, plus :class:`CropPredictor`, the detector at inference: decoded RGB
images in, one padded vehicle box (or a reason) per image out, from ONE forward pass of
:class:`models.detector.DetectorNet` per call.

COCO ``car`` (2) and ``truck`` (7) are merged into one output class, ``vehicle``, as the
seed scripts did; the box with the largest area wins.

The settings a detector's boxes depend on (:data:`DETECTOR_FIELDS`: ``imgsz``, ``conf``,
``keep_classes``) are stored with each fine-tuned version (``meta.json`` ``crop``,
written by ``tasks/detector_train.py``); :func:`detector_settings` applies them wherever
``crop.*`` does not set them explicitly, for the crop stage and serving alike.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from carflow.manifest import DROPPED, KEPT
from carflow.settings import CropSettings

VEHICLE = "vehicle"
#: the crop settings stored with a detector version (``meta.json`` → ``crop``)
DETECTOR_FIELDS = ("imgsz", "conf", "keep_classes")
#: the weights file of a registered detector version (``models.detector.version_weights``)
WEIGHTS_NAME = "weights.pt"


def detector_settings(cfg: CropSettings, meta: Mapping[str, Any] | None) -> CropSettings:
    """``cfg`` with the detector version's stored crop settings (``meta["crop"]``) for
    each of :data:`DETECTOR_FIELDS` that ``cfg`` does not set explicitly (pydantic's
    ``model_fields_set``: an env variable, the YAML file, a keyword or a CLI flag)."""
    stored = (meta or {}).get("crop") or {}
    update = {k: stored[k] for k in DETECTOR_FIELDS if k in stored and k not in cfg.model_fields_set}
    return CropSettings.model_validate({**cfg.model_dump(exclude_unset=True), **update}) if update else cfg


def weights_meta(weights: str) -> dict[str, Any]:
    """The ``meta.json`` of the registered detector version whose ``weights.pt`` is
    ``weights`` (a path or URI, as ``crop.weights=latest`` resolves); ``{}`` for any other
    spec (a hub name, random init, a loose file)."""
    from carflow.keys import META_NAME
    from carflow.storage import local_file

    w = (weights or "").strip()
    if not w.replace("\\", "/").endswith("/" + WEIGHTS_NAME):
        return {}
    try:
        return json.loads(local_file(w[: -len(WEIGHTS_NAME)] + META_NAME).read_text())
    except (FileNotFoundError, ValueError):
        return {}


def largest_box(
    boxes: Any,
    classes: Any,
    confs: Any,
    keep_classes: Sequence[int] = (2, 7),
    conf: float = 0.25,
) -> dict[str, Any] | None:
    """The largest-area box among detections of ``keep_classes`` with confidence ≥ ``conf``.

    ``boxes`` is ``(N, 4)`` xyxy; kept classes are merged into the one class ``vehicle``.
    Ties on area go to the higher confidence. Returns ``{"box": (x0, y0, x1, y1) floats,
    "det_class": "vehicle", "source_class": int, "det_conf": float}`` or ``None``."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    c = np.asarray(classes).reshape(-1).astype(np.int64)
    p = np.asarray(confs, dtype=np.float64).reshape(-1)
    if not (len(b) == len(c) == len(p)):
        raise ValueError(f"boxes/classes/confs lengths differ: {len(b)}, {len(c)}, {len(p)}")
    ok = np.isin(c, np.asarray(list(keep_classes), dtype=np.int64)) & (p >= conf)
    if not ok.any():
        return None
    idx = np.flatnonzero(ok)
    area = np.clip(b[idx, 2] - b[idx, 0], 0, None) * np.clip(b[idx, 3] - b[idx, 1], 0, None)
    best = idx[np.lexsort((-p[idx], -area))[0]]
    return {
        "box": tuple(float(v) for v in b[best]),
        "det_class": VEHICLE,
        "source_class": int(c[best]),
        "det_conf": float(p[best]),
    }


def pad_box(box: Sequence[float], margin: float, width: int, height: int) -> tuple[int, int, int, int]:
    """Grow ``box`` (x0, y0, x1, y1; x1/y1 exclusive) by ``margin`` × its width on the left
    and right and × its height on top and bottom, round outwards to whole pixels and clip
    to the ``width`` × ``height`` image."""
    x0, y0, x1, y1 = (float(v) for v in box)
    dx, dy = margin * max(x1 - x0, 0.0), margin * max(y1 - y0, 0.0)
    return (
        max(0, min(width, math.floor(x0 - dx))),
        max(0, min(height, math.floor(y0 - dy))),
        max(0, min(width, math.ceil(x1 + dx))),
        max(0, min(height, math.ceil(y1 + dy))),
    )


def crop_decision(det: dict[str, Any] | None, width: int, height: int, cfg: CropSettings) -> dict[str, Any]:
    """A detection (from :func:`largest_box`) → the row's status/reason/bbox/class/conf.
    No vehicle → ``no_vehicle``; a padded crop with a side < ``crop.min_side`` → ``too_small``
    (its bbox is still recorded)."""
    if det is None:
        return {"status": DROPPED, "reason": "no_vehicle", "bbox": None, "det_class": None, "det_conf": None}
    bbox = list(pad_box(det["box"], cfg.margin, width, height))
    row = {"status": KEPT, "reason": None, "bbox": bbox, "det_class": det["det_class"], "det_conf": det["det_conf"]}
    if min(bbox[2] - bbox[0], bbox[3] - bbox[1]) < cfg.min_side:
        row.update(status=DROPPED, reason="too_small")
    return row


class CropPredictor:
    """The detector at inference, as the crop stage decides: :meth:`decide` takes decoded
    RGB ``uint8`` images and returns one :func:`crop_decision` per image from one forward
    pass per letterbox shape (rectangular, as ``model.predict`` does for one image and
    the crop stage does for its batches). ``cfg``'s ``imgsz`` / ``conf`` / ``keep_classes``
    come from the version's ``meta`` where ``cfg`` does not set them (:func:`detector_settings`).

    ``net`` is a :class:`models.detector.DetectorNet` (or anything with its ``letterbox``
    and ``detect``); :meth:`load` builds one from ``crop.weights``-style specs."""

    def __init__(self, net: Any, cfg: CropSettings | None = None, version: str | None = None,
                 meta: Mapping[str, Any] | None = None):
        self.net = net
        self.cfg = detector_settings(cfg or CropSettings(), meta)
        self.version = version

    @classmethod
    def load(cls, weights: str, cfg: CropSettings | None = None, version: str | None = None,
             meta: Mapping[str, Any] | None = None) -> CropPredictor:
        """``weights`` (a ``crop.weights``-style spec) with ``cfg``; ``meta`` is the
        version's ``meta.json`` (its stored crop settings: :func:`detector_settings`)."""
        from models.detector import detector_net, load_detector

        cfg = cfg or CropSettings()
        model = load_detector(weights, cache=False)
        return cls(detector_net(model, cfg.device, cfg.precision, cfg.torch_threads), cfg, version, meta)

    def detect(self, images: Sequence[np.ndarray]) -> list[tuple[Any, Any, Any]]:
        """(xyxy, cls, conf) per image, in the image's pixels. Each image is letterboxed
        rectangularly and images are bucketed by letterbox shape, one forward pass per
        shape, as the crop stage batches them (``tasks.crop.stream_batches``): a photo's
        box never depends on what it was batched with."""
        if not len(images):
            return []
        lbs = [self.net.letterbox(a, self.cfg.imgsz, rect=True) for a in images]
        buckets: dict[tuple[int, ...], list[int]] = {}
        for i, lb in enumerate(lbs):
            buckets.setdefault(tuple(lb.shape), []).append(i)
        out: list[Any] = [None] * len(images)
        for idx in buckets.values():
            found = self.net.detect([lbs[i] for i in idx], [images[i].shape[:2] for i in idx], self.cfg.conf,
                                    list(self.cfg.keep_classes))
            for i, det in zip(idx, found, strict=True):
                out[i] = det
        return out

    def decide(self, images: Sequence[np.ndarray]) -> list[dict[str, Any]]:
        """One :func:`crop_decision` per image (``status``, ``reason``, padded ``bbox``...)."""
        out = []
        for arr, (xyxy, cls, conf) in zip(images, self.detect(images), strict=True):
            det = largest_box(xyxy, cls, conf, self.cfg.keep_classes, self.cfg.conf)
            out.append(crop_decision(det, arr.shape[1], arr.shape[0], self.cfg))
        return out
