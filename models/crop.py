"""The crop decision: which detection becomes the crop, and how it is padded.

One home for the box logic that the crop stage (``tasks/crop.py``) and serving
(``serve/``) share, plus :class:`CropPredictor`, the detector at inference: decoded RGB
images in, one padded vehicle box (or a reason) per image out, from ONE forward pass of
:class:`models.detector.DetectorNet` per call.

COCO ``car`` (2) and ``truck`` (7) are merged into one output class, ``vehicle``, as the
seed scripts did; the box with the largest area wins.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from carflow.manifest import DROPPED, KEPT
from carflow.settings import CropSettings

VEHICLE = "vehicle"


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
    pass. Images of one size are letterboxed rectangularly (as ``model.predict`` does for
    one image); mixed sizes go to an ``imgsz`` square canvas (as it does for a list).

    ``net`` is a :class:`models.detector.DetectorNet` (or anything with its ``letterbox``
    and ``detect``); :meth:`load` builds one from ``crop.weights``-style specs."""

    def __init__(self, net: Any, cfg: CropSettings | None = None, version: str | None = None):
        self.net = net
        self.cfg = cfg or CropSettings()
        self.version = version

    @classmethod
    def load(cls, weights: str, cfg: CropSettings | None = None, version: str | None = None) -> CropPredictor:
        from models.detector import detector_net, load_detector

        cfg = cfg or CropSettings()
        model = load_detector(weights, cache=False)
        return cls(detector_net(model, cfg.device, cfg.precision, cfg.torch_threads), cfg, version)

    def detect(self, images: Sequence[np.ndarray]) -> list[tuple[Any, Any, Any]]:
        """(xyxy, cls, conf) per image, in the image's pixels; one forward pass."""
        if not len(images):
            return []
        rect = len({a.shape for a in images}) == 1
        lbs = [self.net.letterbox(a, self.cfg.imgsz, rect=rect) for a in images]
        return self.net.detect(lbs, [a.shape[:2] for a in images], self.cfg.conf, list(self.cfg.keep_classes))

    def decide(self, images: Sequence[np.ndarray]) -> list[dict[str, Any]]:
        """One :func:`crop_decision` per image (``status``, ``reason``, padded ``bbox``...)."""
        out = []
        for arr, (xyxy, cls, conf) in zip(images, self.detect(images), strict=True):
            det = largest_box(xyxy, cls, conf, self.cfg.keep_classes, self.cfg.conf)
            out.append(crop_decision(det, arr.shape[1], arr.shape[0], self.cfg))
        return out
