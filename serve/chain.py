"""The chain a photo goes through, the same as in the pipeline: the fixer
(:func:`carflow.fixer.fix_image`, the clean stage's own decision, per request) → the car
filter → the YOLO crop → the classifier with calibrated probabilities.

:func:`check_photo` runs per request (in a worker thread): the fixer's verdict (a drop is
a :func:`rejection` with the fixer's ``reason``), then the bytes the clean stage would
store (:meth:`~carflow.fixer.FixResult.stored_bytes`: the re-encoded JPEG or the upload
as is) become a :class:`Photo`: their full decode (:func:`carflow.imageio.decode_rgb`, the
crop stage's decode) and the car filter's input
(:meth:`models.car_filter.CarFilterPredictor.preprocess`, the scoring stage's decode +
resize). Every model thus sees the pixels the pipeline's stages see for that photo.

:class:`Chain` runs one *batch* of photos through the three models with ONE forward pass
per model; :class:`Engine` holds the current chain, builds a new one from the registry
(resolve → load → warm up) and swaps it in with one assignment, so a batch already
running finishes on the old one.

The predictors are the pipeline's own (``models/``):

- car filter: :class:`models.car_filter.CarFilterPredictor` (``.preprocess(bytes)``,
  ``.predict_inputs(batch) → p_car``);
- detector: :class:`models.crop.CropPredictor` (``.decide(images) → crop decisions``),
  with the crop settings stored with the detector version (:func:`models.crop.detector_settings`);
- classifier: :class:`models.classifier.ClassifierPredictor`
  (``.labels``, ``.predict_proba(images, calibrated=True)``: the stored temperature).

``loaders`` maps each kind to ``(Version, Settings) → predictor``; the defaults above
are used unless a caller (tests, benches) hands in others.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from carflow.fixer import DecodeBudget, fix_image
from carflow.imageio import decode_rgb
from carflow.labels import split_label
from carflow.manifest import KEPT
from carflow.registry import Registry, Version
from carflow.settings import FixSettings, Settings

KINDS = ("car_filter", "detector", "classifier")

#: plain words for each reason a photo can be refused (the page shows these)
MESSAGES: dict[str, str] = {
    "upload_too_large": "this file is too big to upload",
    "too_many_files": "too many files in one request",
    "empty": "this file is empty",
    "not_image": "this file is not an image",
    "unsupported_format": "this kind of image is not supported",
    "too_large": "this image has too many pixels",
    "too_small": "this image is too small",
    "truncated": "this image is damaged (its data ends early)",
    "decode_error": "this image could not be read",
    "not_scored": "this image could not be read",
    "no_car": "no car found in this photo",
    "no_vehicle": "no car found in this photo to crop",
    "crop_too_small": "the car in this photo is too small",
    "no_input": "send a photo (file) or a url",
    "url_input_off": "url input is turned off on this server",
    "url_not_allowed": "this url is not allowed",
    "url_fetch_failed": "the url could not be fetched",
    "overloaded": "the server is busy, try again shortly",
    "timeout": "the prediction took too long",
    "not_ready": "the models are still loading",
}

#: HTTP status for each reason
STATUS: dict[str, int] = {
    "upload_too_large": 413, "too_many_files": 413, "empty": 400, "not_image": 415,
    "unsupported_format": 415, "too_large": 422, "too_small": 422, "truncated": 422,
    "decode_error": 422, "not_scored": 422, "no_car": 422, "no_vehicle": 422, "crop_too_small": 422,
    "no_input": 400, "url_input_off": 400, "url_not_allowed": 400, "url_fetch_failed": 400,
    "overloaded": 503, "timeout": 504, "not_ready": 503,
}


def rejection(reason: str, detail: str = "", **extra: Any) -> dict[str, Any]:
    """The body of a refused photo: ``status``, ``reason``, a plain-words ``message``."""
    return {"status": "rejected", "reason": reason, "message": MESSAGES.get(reason, reason),
            "detail": detail, "http_status": STATUS.get(reason, 422), **extra}


def resize_square(image: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize to ``size`` × ``size`` (the classifier's input)."""
    from PIL import Image

    if image.shape[0] == size and image.shape[1] == size:
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR))


@dataclass
class Photo:
    """One upload that passed the fixer, ready for the models."""

    #: what the clean stage stores for it: the fixer's re-encoded JPEG, or the upload as is
    data: bytes
    #: upright RGB uint8, :func:`carflow.imageio.decode_rgb` of ``data`` (the crop stage's decode)
    image: np.ndarray
    #: the fixer's actions (``exif_transpose``, ``png_to_jpeg``…)
    actions: list[str] = field(default_factory=list)
    #: ``car_filter.preprocess(data)``, made in the request thread when a chain was loaded
    car_input: np.ndarray | None = field(default=None, repr=False)
    #: the car filter predictor ``car_input`` was made for (a swap in between: made again)
    car_filter: Any = field(default=None, repr=False)


def fix_settings(settings: Settings) -> FixSettings:
    """The fixer's settings for serving: ``fix`` as the clean stage runs it, except
    ``serve.max_pixels`` / ``serve.allowed_formats`` where those are set explicitly."""
    s = settings.serve
    update: dict[str, Any] = {}
    if "max_pixels" in s.model_fields_set:
        update["max_pixels"] = s.max_pixels
    if s.allowed_formats:
        update["allowed_formats"] = [f.lower() for f in s.allowed_formats]
    return settings.fix.model_copy(update=update) if update else settings.fix


def check_photo(data: bytes, cfg: FixSettings, budget: DecodeBudget | None = None,
                car_filter: Any = None) -> Photo | dict[str, Any]:
    """The fixer's verdict on one upload → a :class:`Photo` or a :func:`rejection` with
    the fixer's ``reason`` (the one the clean stage records for the same bytes). With a
    ``car_filter``, its input is made here too (in the caller's thread, not the batch's)."""
    res = fix_image(data, cfg, budget)
    if res.status != KEPT:
        return rejection(res.reason or "decode_error", res.error or "")
    stored = res.stored_bytes(data)
    try:
        image = decode_rgb(stored, cfg.max_pixels)
    except Exception as exc:  # noqa: BLE001 - the crop stage's decode_error
        return rejection("decode_error", f"{type(exc).__name__}: {exc}"[:300])
    photo = Photo(stored, image, list(res.actions))
    if car_filter is not None:
        photo.car_input, photo.car_filter = car_filter.preprocess(stored), car_filter
    return photo


@dataclass
class Chain:
    """Three loaded predictors and their versions; :meth:`run` is one batch."""

    car_filter: Any
    detector: Any
    classifier: Any
    versions: dict[str, str]
    car_threshold: float
    top_k: int = 5
    loaded_at: float = field(default_factory=time.time)

    def labels(self) -> list[str]:
        return list(self.classifier.labels)

    def classify(self, crops: Sequence[np.ndarray]) -> np.ndarray:
        """Calibrated class probabilities (N, classes) for crops, one forward pass."""
        size = int(getattr(self.classifier, "image_size", 0) or 0)
        batch = [resize_square(c, size) for c in crops] if size else list(crops)
        return np.asarray(self.classifier.predict_proba(np.stack(batch) if size else batch, calibrated=True))

    def car_inputs(self, photos: Sequence[Photo]) -> list[np.ndarray | None]:
        """Each photo's car filter input, made again where it was made for another
        predictor (a swap between the request and its batch)."""
        return [p.car_input if p.car_filter is self.car_filter and p.car_input is not None
                else self.car_filter.preprocess(p.data) for p in photos]

    def run(self, photos: Sequence[Photo]) -> list[dict[str, Any]]:
        """Checked photos → one result per photo. ``timings_ms`` holds each model step's
        time for the whole batch (one forward pass each)."""
        n = len(photos)
        images = [p.image for p in photos]
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        inputs = self.car_inputs(photos)
        scored = [i for i in range(n) if inputs[i] is not None]
        p_car = np.full(n, np.nan)
        if scored:
            p_car[scored] = np.asarray(self.car_filter.predict_inputs(np.stack([inputs[i] for i in scored])),
                                       dtype=np.float64).reshape(-1)
        t1 = time.perf_counter()
        timings["car_filter"] = (t1 - t0) * 1000
        results: list[dict[str, Any] | None] = [None] * n
        for i in range(n):
            if i not in scored:
                results[i] = rejection("not_scored", "the car filter could not decode it")
            elif p_car[i] < self.car_threshold:
                results[i] = rejection("no_car", f"p_car {p_car[i]:.3f} < {self.car_threshold}", p_car=float(p_car[i]))
        cars = [i for i in scored if p_car[i] >= self.car_threshold]
        decisions = self.detector.decide([images[i] for i in cars]) if cars else []
        t2 = time.perf_counter()
        timings["detector"] = (t2 - t1) * 1000
        kept: list[tuple[int, list[int], float]] = []
        for i, d in zip(cars, decisions, strict=True):
            box = [int(v) for v in d["bbox"]] if d.get("bbox") is not None else None
            if d["status"] != KEPT:
                reason = "crop_too_small" if d["reason"] == "too_small" else d["reason"]
                results[i] = rejection(reason, d["reason"], p_car=float(p_car[i]), box=box,
                                       det_conf=d.get("det_conf"))
            else:
                kept.append((i, box, float(d["det_conf"])))
        probs = self.classify([images[i][b[1]:b[3], b[0]:b[2]] for i, b, _c in kept]) if kept else None
        t3 = time.perf_counter()
        timings["classifier"] = (t3 - t2) * 1000
        labels = self.labels()
        for row, (i, box, det_conf) in enumerate(kept):
            p = probs[row]
            order = np.argsort(-p)[: self.top_k]
            top = []
            for j in order:
                parts = split_label(labels[j])
                top.append({"label": labels[j], "make": parts["make"], "model": parts["model"],
                            "year": parts["year"], "probability": float(p[j])})
            results[i] = {"status": "ok", "top": top, "box": box, "det_conf": det_conf,
                          "p_car": float(p_car[i]), "http_status": 200}
        for photo, r in zip(photos, results, strict=True):
            r.update(fix_actions=photo.actions, batch_size=n, model_ms={k: round(v, 2) for k, v in timings.items()},
                     versions=dict(self.versions))
        return results  # type: ignore[return-value]

    def warm(self, size: int = 256) -> None:
        """One call of each model on a neutral photo, so the first request pays no
        graph compilation or lazy initialisation."""
        import io

        from PIL import Image

        rng = np.random.default_rng(0)
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "JPEG")
        photo = Photo(buf.getvalue(), decode_rgb(buf.getvalue()))
        x = self.car_filter.preprocess(photo.data)
        self.car_filter.predict_inputs(np.stack([x, x]))
        self.detector.decide([photo.image])
        self.classify([photo.image, photo.image])


# -- loading ------------------------------------------------------------------------------
Loader = Callable[[Version, Settings], Any]


def load_car_filter(version: Version, settings: Settings) -> Any:
    """The version's ``model.keras`` in the runtime/precision the scoring stage resolves
    from ``car_filter.runtime``/``precision``; its width (``alpha``, for the fp16 copy on a
    GPU) from its ``meta.json``, as the scoring stage reads it (``tasks.car_filter.resolve_model``)."""
    from models.car_filter import CarFilterPredictor

    cf = settings.car_filter
    return CarFilterPredictor.load(str(version.local_path()), runtime=cf.runtime, precision=cf.precision,
                                   alpha=float(version.meta.get("alpha", cf.alpha)), version=version.version)


def load_detector(version: Version, settings: Settings) -> Any:
    """The version's ``weights.pt`` with the crop settings stored in its ``meta.json``
    (``imgsz``, ``conf``, ``keep_classes``), where ``crop.*`` does not set them explicitly."""
    from models.crop import CropPredictor

    return CropPredictor.load(str(version.local_path()), settings.crop, version=version.version, meta=version.meta)


def load_classifier(version: Version, settings: Settings) -> Any:
    """The resolved version itself (no second resolve): its labels, config, temperature."""
    from models.classifier import ClassifierPredictor

    return ClassifierPredictor.load(version)


DEFAULT_LOADERS: dict[str, Loader] = {
    "car_filter": load_car_filter,
    "detector": load_detector,
    "classifier": load_classifier,
}


class Engine:
    """The current :class:`Chain`, and building/swapping a new one.

    :meth:`reload` resolves the three specs (``serve.car_filter`` / ``detector`` /
    ``classifier``: ``latest``, a version, a path or URI), loads what changed (an
    unchanged version keeps its loaded predictor), warms the new chain, then swaps it
    in with one assignment. Requests keep being served by the old chain meanwhile;
    a failed reload leaves it in place."""

    def __init__(self, settings: Settings, registry: Registry | None = None,
                 loaders: Mapping[str, Loader] | None = None):
        self.settings = settings
        self.registry = registry or Registry(settings.storage)
        self.loaders = {**DEFAULT_LOADERS, **(loaders or {})}
        self.chain: Chain | None = None
        self._lock = threading.Lock()
        self.last_error: str | None = None

    def specs(self) -> dict[str, str]:
        s = self.settings.serve
        return {"car_filter": s.car_filter, "detector": s.detector, "classifier": s.classifier}

    def resolve(self) -> dict[str, Version]:
        return {kind: self.registry.resolve(kind, spec, setting=f"serve.{kind} [CARFLOW_SERVE__{kind.upper()}]")
                for kind, spec in self.specs().items()}

    def changed(self) -> bool:
        """Whether a registry pointer now names another version than the one serving."""
        current = self.chain.versions if self.chain else {}
        return {k: v.version for k, v in self.resolve().items()} != current

    def build(self) -> Chain:
        versions = self.resolve()
        old = self.chain
        loaded = {}
        for kind in KINDS:
            v = versions[kind]
            if old is not None and old.versions.get(kind) == v.version:
                loaded[kind] = getattr(old, kind)
            else:
                loaded[kind] = self.loaders[kind](v, self.settings)
        s = self.settings.serve
        threshold = s.car_threshold if s.car_threshold is not None else self.settings.car_filter.threshold
        chain = Chain(loaded["car_filter"], loaded["detector"], loaded["classifier"],
                      {k: v.version for k, v in versions.items()}, threshold, s.top_k)
        chain.warm()
        return chain

    def reload(self) -> dict[str, Any]:
        """Build, warm and swap in the chain the specs name now. Returns what happened."""
        with self._lock:
            before = dict(self.chain.versions) if self.chain else None
            started = time.perf_counter()
            try:
                chain = self.build()
            except Exception as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"
                raise
            self.chain = chain  # the swap: the next batch runs on the new chain
            self.last_error = None
            return {"before": before, "versions": dict(chain.versions), "changed": before != chain.versions,
                    "seconds": round(time.perf_counter() - started, 3)}
