"""Helpers for the serve tests and bench: run an app on a loopback port with real
uvicorn, and small stand-in predictors with the predictor interfaces (the chain, the
registry, batching, limits and swaps are the real ones; the models are a few lines of
numpy each, so those tests take seconds, not a training run).

The stand-in photos are a grey scene with one saturated rectangle (the "car") whose hue
is the class; the car filter says "car" when there is such a rectangle, the detector's
network returns its bounding box, and the classifier scores classes by hue distance,
softened by the stored temperature."""

from __future__ import annotations

import io
import time
from typing import Any

import numpy as np
from PIL import Image

from demo.serving import free_port, running  # noqa: F401 - re-exported: the serve tests import them from here

#: class label → RGB colour of its "car"
CLASS_COLOURS = {
    "audi_a4": (220, 30, 30),
    "bmw_3-series": (30, 30, 220),
    "fiat_500_2015": (30, 200, 30),
    "volkswagen_golf": (220, 200, 30),
    "mercedes-benz_c-class": (200, 30, 200),
    "toyota_corolla": (30, 200, 200),
}


def scene(label: str | None, size: tuple[int, int] = (320, 240), box: tuple[int, int, int, int] = (60, 50, 260, 190),
          seed: int = 0) -> np.ndarray:
    """A grey noisy scene, with a ``label``-coloured rectangle at ``box`` (none for None)."""
    rng = np.random.default_rng(seed)
    w, h = size
    arr = rng.integers(90, 140, (h, w, 3), dtype=np.uint8)
    if label is not None:
        x0, y0, x1, y1 = box
        arr[y0:y1, x0:x1] = CLASS_COLOURS[label]
    return arr


def jpeg(arr: np.ndarray, quality: int = 92) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def bomb_png(width: int = 30_000, height: int = 30_000) -> bytes:
    """A valid small PNG whose header declares ``width`` × ``height`` (CRC fixed)."""
    import struct
    import zlib

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 20, 30)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4: ihdr + 12] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr: ihdr + 17])) & 0xFFFFFFFF
    data[ihdr + 17: ihdr + 21] = struct.pack(">I", crc)
    return bytes(data)


def _saturated(arr: np.ndarray) -> np.ndarray:
    a = arr.astype(np.int16)
    return (a.max(axis=2) - a.min(axis=2)) > 100


class StandInCarFilter:
    """:class:`models.car_filter.CarFilterPredictor`'s serving interface:
    ``preprocess(bytes)`` → a 64×64 decode (nearest), ``predict_inputs(batch) → p_car``:
    the share of saturated pixels, scaled (≥ 2% → ~1)."""

    image_size = 64

    def __init__(self, version: str, delay_s: float = 0.0):
        self.version, self.delay_s, self.calls = version, delay_s, []

    def preprocess(self, data: bytes):
        try:
            with Image.open(io.BytesIO(data)) as im:
                small = im.convert("RGB").resize((self.image_size, self.image_size), Image.Resampling.NEAREST)
        except Exception:  # noqa: BLE001 - undecodable: not scored, as the real one
            return None
        return np.asarray(small, np.float32)

    def predict_inputs(self, x):
        self.calls.append(len(x))
        time.sleep(self.delay_s)
        return np.array([min(1.0, _saturated(np.asarray(im)).mean() * 50) for im in x], np.float32)


class StandInNet:
    """:class:`models.detector.DetectorNet`'s interface: the box of the saturated pixels,
    as COCO class 2 (car); identity letterbox."""

    def __init__(self):
        self.calls: list[int] = []

    def letterbox(self, image, imgsz, rect=True):
        return image

    def detect(self, letterboxed, orig_shapes, conf, classes):
        self.calls.append(len(letterboxed))
        out = []
        for arr in letterboxed:
            ys, xs = np.nonzero(_saturated(arr))
            if len(xs):
                out.append((np.array([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], np.float32),
                            np.array([2.0]), np.array([0.9])))
            else:
                out.append((np.zeros((0, 4), np.float32), np.zeros(0), np.zeros(0)))
        return out


class StandInClassifier:
    """``labels`` + ``predict_proba(images, calibrated=True)``: softmax of minus the
    distance from each crop's mean colour to each class colour, divided by the stored
    temperature when calibrated."""

    def __init__(self, version: str, labels: list[str], temperature: float = 1.0, delay_s: float = 0.0,
                 image_size: int = 32):
        self.version, self.labels, self.temperature, self.delay_s = version, labels, temperature, delay_s
        self.image_size = image_size
        self.calls: list[int] = []

    def predict_proba(self, images, calibrated=True):
        x = np.asarray(images, dtype=np.float64)
        self.calls.append(len(x))
        time.sleep(self.delay_s)
        means = x.reshape(len(x), -1, 3).mean(axis=1)
        colours = np.array([CLASS_COLOURS[lbl] for lbl in self.labels], np.float64)
        logits = -np.linalg.norm(means[:, None, :] - colours[None], axis=2) / 20
        if calibrated:
            logits = logits / self.temperature
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)


def register_stand_ins(registry, version: str = "v1", labels: list[str] | None = None, temperature: float = 1.0,
                       delay_s: float = 0.0, promote: bool = True) -> dict[str, str]:
    """Put one version of each kind in ``registry`` (meta.json carries what the stand-ins
    need) and move ``latest`` to them."""
    labels = labels or list(CLASS_COLOURS)
    meta = {"labels": labels, "temperature": temperature, "delay_s": delay_s}
    out = {}
    for kind, main in (("car_filter", "model.keras"), ("detector", "weights.pt"), ("classifier", "model.keras")):
        v = registry.put_version(kind, {main: f"stand-in {kind} {version}".encode()}, meta, version=version)
        if promote:
            registry.promote(kind, v)
        out[kind] = v.version
    return out


def stand_in_loaders(record: dict | None = None) -> dict[str, Any]:
    """Loaders building the stand-ins from a version's meta.json; ``record`` collects them."""
    from models.crop import CropPredictor

    record = record if record is not None else {}

    def car_filter(v, settings):
        p = StandInCarFilter(v.version, v.meta.get("delay_s", 0.0))
        record.setdefault("car_filter", []).append(p)
        return p

    def detector(v, settings):
        p = CropPredictor(StandInNet(), settings.crop, version=v.version)
        record.setdefault("detector", []).append(p)
        return p

    def classifier(v, settings):
        p = StandInClassifier(v.version, v.meta["labels"], v.meta.get("temperature", 1.0), v.meta.get("delay_s", 0.0))
        record.setdefault("classifier", []).append(p)
        return p

    return {"car_filter": car_filter, "detector": detector, "classifier": classifier}
