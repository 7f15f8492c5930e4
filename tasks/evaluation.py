"""Evaluation: how well a model's outputs match known answers.

- the car filter's threshold metrics (:func:`metrics_at`, :func:`threshold_table`): car
  precision/recall, no_car recall and accuracy per threshold, written into a trained
  filter's ``metrics.json``;
- the detector's boxes against ground truth (:func:`iou`, :func:`box_hits`: the real crop
  path over photos with known boxes, the share of cars found with IoU ≥ 0.5).
"""

from __future__ import annotations

import tempfile
import time
from typing import Any

import numpy as np

from carflow.storage import LocalStorage

#: the thresholds a car filter's ``metrics.json`` reports
THRESHOLDS = [round(t, 2) for t in np.arange(0.05, 0.951, 0.05)]


# ---------------------------------------------------------------- car filter: thresholds


def threshold_table(y_car: np.ndarray, p_car: np.ndarray) -> list[dict[str, float]]:
    """Precision/recall of "car" (p ≥ t), recall of no_car (p < t) and accuracy per threshold."""
    return [metrics_at(y_car, p_car, t) for t in THRESHOLDS]


def metrics_at(y_car: np.ndarray, p_car: np.ndarray, t: float) -> dict[str, float]:
    """A binary "car" decision at threshold ``t`` (car = ``p ≥ t``) against ``y_car``:
    accuracy, car precision/recall, no_car recall, the car false-drop rate, kept fraction."""
    y = np.asarray(y_car).astype(bool)
    pred = np.asarray(p_car) >= t
    tp = int((pred & y).sum())
    fp = int((pred & ~y).sum())
    fn = int((~pred & y).sum())
    tn = int((~pred & ~y).sum())
    n = max(len(y), 1)
    return {
        "threshold": float(t),
        "accuracy": (tp + tn) / n,
        "precision": tp / (tp + fp) if tp + fp else 1.0,
        "recall": tp / (tp + fn) if tp + fn else 1.0,
        "no_car_recall": tn / (tn + fp) if tn + fp else 1.0,
        "car_false_drop_rate": fn / (tp + fn) if tp + fn else 0.0,
        "kept_fraction": float(pred.mean()) if len(pred) else 0.0,
    }


# ---------------------------------------------------------------- detector: boxes


def iou(a: Any, b: Any) -> float:
    """Intersection over union of two ``[x0, y0, x1, y1]`` boxes."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def box_hits(photos: list[dict[str, Any]], weights: str, imgsz: int, conf: float = 0.25,
             device: str = "") -> dict[str, Any]:
    """Run the crop path (margin 0) over ground-truth ``photos`` (each with ``data``,
    ``is_car``, ``bbox``) → car count, IoU ≥ 0.5 rate, mean IoU, cars without a box,
    non-car photos that got a box."""
    from carflow.settings import CropSettings
    from models.detector import load_detector
    from tasks.crop import crop_images

    with tempfile.TemporaryDirectory(prefix="carflow-boxes-") as tmp:
        store = LocalStorage(tmp)
        ids = [store.put_image(p["data"]) for p in photos]
        cfg = CropSettings(weights=weights, imgsz=imgsz, conf=conf, margin=0.0, min_side=1, device=device)
        t0 = time.monotonic()
        rows = crop_images(store, ids, load_detector(weights), cfg)
        seconds = time.monotonic() - t0
    cars = [(p, r) for p, r in zip(photos, rows, strict=True) if p["is_car"]]
    ious = [iou(r["bbox"], p["bbox"]) if r["bbox"] else 0.0 for p, r in cars]
    return {
        "photos": len(photos),
        "cars": len(cars),
        "iou50_rate": round(sum(i >= 0.5 for i in ious) / len(ious), 4) if ious else None,
        "mean_iou": round(sum(ious) / len(ious), 4) if ious else None,
        "cars_without_box": sum(r["bbox"] is None for _, r in cars),
        "non_car_with_box": sum(r["bbox"] is not None for p, r in zip(photos, rows, strict=True) if not p["is_car"]),
        "seconds": round(seconds, 2),
    }
