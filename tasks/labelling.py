"""The car filter's labelling kit: a stratified sample of kept images to label by hand,
and the import of the labels.

- :func:`sample_for_labelling`: up to ``n`` unique kept images, stratified by site and
  label;
- :func:`write_labelling_kit`: ``labels.csv`` + thumbnails + captioned contact sheets
  under a storage prefix;
- :func:`import_labels`: the filled-in CSV, or a ``car/`` / ``no_car/`` folder tree →
  ``image_id,label``.
"""

from __future__ import annotations

import csv
import io
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pandas as pd

from carflow.keys import labelling_kit_key, labelling_thumb
from carflow.manifest import KEPT
from carflow.storage import Storage, open_storage
from tasks.report import contact_sheet

LABELS = ("car", "no_car")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp")


def _kept_unique(df: pd.DataFrame) -> pd.DataFrame:
    kept = df[df["status"] == KEPT]
    order = ["first_seen", "image_id"] if "first_seen" in kept.columns else ["image_id"]
    return kept.sort_values(order, kind="stable").drop_duplicates("image_id").reset_index(drop=True)


def sample_for_labelling(df: pd.DataFrame, n: int, seed: int = 0) -> pd.DataFrame:
    """Up to ``n`` unique kept images, stratified by (site, label): each stratum gets its
    share of the sample (proportional allocation, systematic within a seeded shuffle,
    so every stratum with at least ``total / n`` images is represented)."""
    pool = _kept_unique(df)
    if pool.empty or n <= 0:
        return pool.iloc[:0].copy()
    if n >= len(pool):
        return pool.sort_values("image_id").reset_index(drop=True)
    rng = np.random.default_rng(seed)
    pool = pool.iloc[rng.permutation(len(pool))].reset_index(drop=True)
    strata = pool["site"].astype(str).fillna("") + "\0" + pool["label"].astype(str).fillna("")
    rank = pool.groupby(strata, sort=False).cumcount()
    size = strata.map(strata.value_counts())
    # position of each row inside its stratum in (0, 1): taking the n smallest positions
    # takes about n * size / total rows of each stratum (ties broken at random)
    pool["_pos"] = (rank + 0.5) / size
    pool["_tie"] = rng.random(len(pool))
    out = pool.sort_values(["_pos", "_tie"], kind="stable").head(n).drop(columns=["_pos", "_tie"])
    return out.sort_values("image_id").reset_index(drop=True)


def _thumbnail(data: bytes, size: int = 256) -> bytes | None:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.format == "JPEG":
                im.draft("RGB", (size, size))
            im.thumbnail((size, size))
            out = io.BytesIO()
            im.convert("RGB").save(out, "JPEG", quality=85)
            return out.getvalue()
    except Exception:  # noqa: BLE001 - the contact sheet shows it as undecodable
        return None


def write_labelling_kit(
    store: Storage, df_sample: pd.DataFrame, out_prefix: str, per_sheet: int = 60
) -> dict[str, Any]:
    """Write a labelling kit under ``out_prefix``: ``labels.csv`` (``image_id,label`` with
    the label empty, plus ``site,listing_id,thumb`` for context), ``thumbs/<image_id>.jpg``
    and ``contact_sheet-NNN.png`` pages (thumbnails captioned with the id prefix)."""
    ids = df_sample["image_id"].tolist()

    def fetch(image_id: str) -> bytes | None:
        try:
            return store.get_image(image_id)
        except KeyError:
            return None

    thumbs: dict[str, bytes | None] = {}
    with ThreadPoolExecutor(max_workers=8) as pool:
        for image_id, data in zip(ids, pool.map(fetch, ids), strict=True):
            thumb = _thumbnail(data) if data else None
            thumbs[image_id] = thumb
            if thumb is not None:
                store.put(labelling_kit_key(out_prefix, labelling_thumb(image_id)), thumb, content_type="image/jpeg")
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["image_id", "label", "site", "listing_id", "thumb"])
    for row in df_sample.itertuples():
        writer.writerow(
            [row.image_id, "", getattr(row, "site", ""), getattr(row, "listing_id", ""),
             labelling_thumb(row.image_id)]
        )
    store.put(labelling_kit_key(out_prefix, "labels.csv"), buf.getvalue().encode(), content_type="text/csv")
    sheets = []
    for page, start in enumerate(range(0, max(len(ids), 1), per_sheet), 1):
        chunk = ids[start : start + per_sheet]
        png = contact_sheet(
            [(thumbs.get(i), i[:12]) for i in chunk],
            title=f"label car / no_car — page {page} ({len(ids)} images)",
        )
        key = labelling_kit_key(out_prefix, f"contact_sheet-{page:03d}.png")
        store.put(key, png, content_type="image/png")
        sheets.append(store.uri(key))
    return {
        "labels_csv": store.uri(labelling_kit_key(out_prefix, "labels.csv")),
        "images": len(ids),
        "thumbs": sum(t is not None for t in thumbs.values()),
        "contact_sheets": sheets,
    }


def _parse_labels_csv(text: str, where: str) -> pd.DataFrame:
    reader = csv.DictReader(io.StringIO(text))
    if not reader.fieldnames or not {"image_id", "label"} <= set(reader.fieldnames):
        raise ValueError(f"{where}: a labels CSV needs the columns image_id,label (got {reader.fieldnames})")
    rows = []
    for line, rec in enumerate(reader, 2):
        image_id = (rec.get("image_id") or "").strip()
        label = (rec.get("label") or "").strip().lower().replace("-", "_").replace(" ", "_")
        if not image_id or not label:
            continue  # not labelled (yet)
        if label not in LABELS:
            raise ValueError(f"{where}:{line}: label {rec.get('label')!r} for {image_id} is not one of {LABELS}")
        rows.append((image_id, label))
    return pd.DataFrame(rows, columns=["image_id", "label"])


def import_labels(source: str) -> pd.DataFrame:
    """Labels → DataFrame ``image_id,label`` (label ∈ {car, no_car}).

    ``source`` is a ``.csv`` file (the labelling kit's ``labels.csv``, rows with an empty
    label are skipped) or a folder / ``s3://`` prefix holding ``car/`` and ``no_car/``
    with files named ``<image_id>.<ext>`` (e.g. the kit's thumbnails sorted by hand)."""
    text = os.fspath(source)
    if text.lower().endswith(".csv"):
        head, _, name = text.rpartition("/")
        data = open_storage(head or ".").get(name)
        df = _parse_labels_csv(data.decode("utf-8-sig"), text)
    else:
        store = open_storage(text)
        rows = []
        for label in LABELS:
            for key in store.list(f"{label}/"):
                name = key.rsplit("/", 1)[-1]
                if name.startswith(".") or not name.lower().endswith(IMAGE_EXTS):
                    continue
                rows.append((name.split(".", 1)[0], label))
        if not rows:
            raise ValueError(f"{text}: no labelled images (expected car/<image_id>.jpg and no_car/<image_id>.jpg)")
        df = pd.DataFrame(rows, columns=["image_id", "label"])
    conflicts = df.groupby("image_id")["label"].nunique()
    conflicts = conflicts[conflicts > 1]
    if len(conflicts):
        raise ValueError(f"{text}: {len(conflicts)} image(s) labelled both car and no_car, e.g. {conflicts.index[0]}")
    return df.drop_duplicates("image_id").sort_values("image_id").reset_index(drop=True)
