"""Scoring the model stages' manifests against the demo's ground truth: which photo kinds
the car filter dropped, and how well the crop boxes overlap the true car boxes."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

import pandas as pd

from carflow.manifest import KEPT
from demo.generate import NON_CAR_KINDS as PLANTED_NON_CAR

#: every non-car photo kind of the site: the planted ones and the dealer banner
NON_CAR_KINDS = (*PLANTED_NON_CAR, "banner")


def score_model_stages(car_filter: pd.DataFrame, crop: pd.DataFrame, truth: Mapping[str, dict[str, Any]],
                       iou: Callable[[Any, Any], float]) -> dict[str, Any]:
    """Per photo kind, how many unique images each stage saw and dropped; the crop boxes
    (padded) vs the true car boxes through ``iou`` (``tasks.evaluation.iou``). ``truth``:
    ground-truth photos by sha256 (``demo.labeller.photos_by_sha256``); a stage that was
    passed through (no ``p_car`` / ``crop_id`` column) is left out."""
    out: dict[str, Any] = {}

    def kinds(df: pd.DataFrame) -> pd.Series:
        return df["source_id"].map(lambda s: truth.get(s, {}).get("kind", "unknown"))

    if "p_car" in car_filter.columns:
        seen = car_filter[car_filter["p_car"].notna()].drop_duplicates("image_id")
        k = kinds(seen)
        drop = seen["reason"] == "no_car"
        by_kind = {kind: {"images": int((k == kind).sum()), "dropped_no_car": int((drop & (k == kind)).sum())}
                   for kind in sorted(set(k))}
        non_car = k.isin(NON_CAR_KINDS)
        out["car_filter"] = {
            "by_kind": by_kind,
            "non_car_images": int(non_car.sum()),
            "non_car_dropped": int((drop & non_car).sum()),
            "car_images": int((k == "car").sum()),
            "car_dropped": int((drop & (k == "car")).sum()),
            "accuracy": round(float(((~drop) == (k == "car")).mean()), 4) if len(seen) else None,
        }
    if "crop_id" in crop.columns:
        rows = crop.drop_duplicates("image_id")
        k = kinds(rows)
        reached = rows["reason"].isin(["no_vehicle", "too_small", "decode_error"]) | (rows["status"] == KEPT)
        cars = rows[(rows["status"] == KEPT) & (k == "car")]
        ious = [iou(b, truth[s]["bbox"]) for b, s in zip(cars["bbox"], cars["source_id"], strict=True)
                if b is not None and truth.get(s, {}).get("bbox")]
        out["crop"] = {
            "by_kind": {kind: dict(Counter(rows.loc[reached & (k == kind), "reason"].fillna("kept")))
                        for kind in sorted(set(k[reached]))},
            "kept_cars": len(cars),
            "kept_non_car": int(((rows["status"] == KEPT) & k.isin(NON_CAR_KINDS)).sum()),
            "iou50_rate": round(sum(i >= 0.5 for i in ious) / len(ious), 4) if ious else None,
            "mean_iou": round(sum(ious) / len(ious), 4) if ious else None,
        }
    return out


def score_finders(evaluation: Mapping[str, Any], dataset: pd.DataFrame, gt: Mapping[str, Any]) -> dict[str, Any]:
    """The evaluation's label-problem finders against the planted problems of the ground
    truth (``gt["label_problems"]``):

    - ``label_issues``: of the val+test images whose photo is a planted mislabelled one
      (``planted``), how many are among the first ``planted`` ranked issues (``hits``),
      against ``random`` = the hits a random ranking would expect;
    - ``merge``: the top suggested merge and whether it is the planted look-alike pair.

    ``evaluation``: the evaluation's ``metrics.json``; ``dataset``: the dataset manifest
    (to map each train image, a crop, to its photo's ``source_id``)."""
    problems = gt.get("label_problems") or {}
    planted_photos = set((problems.get("mislabelled") or {}).get("images", []))
    train_col = "train_image_id" if "train_image_id" in dataset.columns else "image_id"
    rows = dataset[dataset["split"].isin(["val", "test"])]
    source = dict(zip(rows[train_col].astype(str), rows["source_id"].astype(str), strict=True))
    planted = {i for i, s in source.items() if s in planted_photos}
    everywhere = dataset[dataset["split"].notna() & dataset["source_id"].astype(str).isin(planted_photos)]
    issues = (evaluation.get("label_issues") or {})
    ranked = [str(r["image_id"]) for r in issues.get("top", [])]
    k = len(planted)
    hits = sum(1 for i in ranked[:k] if i in planted)
    examined = int(issues.get("examined") or len(source) or 1)
    merges = evaluation.get("suggested_merges") or []
    look = sorted((problems.get("look_alike") or {}).get("classes", []))
    top = sorted(merges[0]["classes"]) if merges else []
    return {
        "label_issues": {"planted": k, "hits": hits, "found": int(issues.get("count", 0)), "examined": examined,
                         "random": round(k * k / examined, 2),
                         "planted_per_split": {str(a): int(b) for a, b in everywhere["split"].value_counts().items()}},
        "merge": {"top": top, "look_alike": look, "is_look_alike": bool(look) and top == look,
                  "suggested": len(merges)},
    }
