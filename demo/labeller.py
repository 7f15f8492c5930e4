"""The demo's stand-in for a human labeller: fills in a car filter labelling kit from
the generated site's ground truth.

A kit's ``labels.csv`` (``tasks.car_filter.write_labelling_kit``) lists ``image_id``s of
the clean manifest with an empty ``label``. The clean stage may have re-encoded a photo
(new ``image_id``), so rows are matched to the ground truth through the manifest's
``source_id`` (the sha256 of the bytes as served = the ground truth's ``sha256``).
"""

from __future__ import annotations

import csv
import io
from collections import Counter
from collections.abc import Mapping
from typing import Any


def photos_by_sha256(gt: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Every ground-truth photo that has bytes, by its sha256."""
    return {p["sha256"]: p for lst in gt["listings"] for p in lst["photos"] if p.get("sha256")}


def truth_label(image_id: str, source_ids: Mapping[str, str], truth: Mapping[str, Mapping[str, Any]]) -> str:
    """``car`` / ``no_car`` for a manifest ``image_id`` (through its ``source_id``), or
    ``""`` when the ground truth does not know the photo."""
    photo = truth.get(source_ids.get(image_id, image_id))
    return "" if photo is None else ("car" if photo["is_car"] else "no_car")


def fill_labels_csv(
    kit_csv: str, source_ids: Mapping[str, str], truth: Mapping[str, Mapping[str, Any]]
) -> tuple[str, Counter[str]]:
    """``kit_csv`` with ``label`` = ``car`` / ``no_car`` from the ground truth's ``is_car``.

    ``source_ids`` maps a manifest ``image_id`` to its ``source_id``; a row whose photo the
    ground truth does not know keeps an empty label (the importer skips it). Returns the
    filled CSV text and the label counts (``unknown`` for rows left empty)."""
    reader = csv.DictReader(io.StringIO(kit_csv))
    fields = list(reader.fieldnames or ["image_id", "label"])
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    counts: Counter[str] = Counter()
    for row in reader:
        row["label"] = truth_label(row["image_id"], source_ids, truth)
        counts[row["label"] or "unknown"] += 1
        writer.writerow(row)
    return out.getvalue(), counts
