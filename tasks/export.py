"""Dataset exports: the files training reads.

Both exports read the dataset manifest's *dataset rows* (``split`` set) and write the
image each row trains on, ``train_image_id`` (:func:`with_train_image_id`): the crop
(``crop_id``) when the dataset was built from the crop manifest, else the photo
(``image_id``). A dataset row without a train image is an error (:class:`ExportError`),
never a silent fallback to the uncropped photo.

* **Folders** (:func:`export_folders`): the seeds' layout
  ``<split>/<class>/<train_image_id>.jpg``, bytes as stored, to a local folder or an
  ``s3://`` prefix; files already there are skipped, so a rerun copies only new images.
* **TFRecord** (:func:`export_tfrecords`), the training format, **incremental and
  content-keyed**:

  - shards ``datasets/exports/<family>/shards/<content key>.tfrecord`` (family =
    ``tfrecord-<size>-<fit>-q<quality>``) of ``tf.train.Example`` records
    (:data:`FEATURES`: the JPEG resized at export — by default to ``size``×``size``, or
    with ``fit="shorter"`` to a shorter side of ``size``; never upscaled —, the row's
    **label text** (not a class index), multilabel ``attributes``, the train image,
    photo and listing ids), each with its member rows beside it
    (``<content key>.parquet``, written after the records: it marks the shard complete).
    The key hashes the shard's sorted rows + size + fit + quality + format version, so
    a shard is immutable and never rewritten in place;
  - per dataset version an index ``datasets/<version>/export.json``, written last (the
    pointer): per split its shards and counts, the classes (index order), the map label
    text → class, per-image overrides (label-conflict relabels), the image ids it
    **excludes** (rows still in a reused shard that this version does not train on:
    an ignored or dropped class, a dropped row), task and label names;
  - an export starts from its family's last index (``datasets/exports/<family>/latest.json``)
    and reuses every shard that is still right (see :func:`export_tfrecords`): new
    images go into new shards (cut by first appearance, as ``tasks/shards.py`` does for
    stages), a class merge or an ignore-list change re-encodes nothing, a row that
    changed split re-encodes its old shard. A reader of an older index keeps working
    while a new export runs (nothing it lists is touched); stale shards are removed only
    by :func:`gc_export_shards` (``carflow dataset --gc-exports``).

  ``bench/dataset_read.py`` measured this format against the seeds' folders read with
  ``image_dataset_from_directory`` (see the README): the decode of the stored JPEG is
  the cost that remains, so the square size×size JPEGs read fastest (and are the
  smallest); uint8 arrays skip the decode but take ~5–14× the bytes.

Reading: :func:`open_export` → :class:`ExportIndex` (classes, size, splits, local shard
files — ``s3://`` shards downloaded once to a cache —, counts, label text → index,
excluded ids) and :func:`iter_examples`, a pure-Python reader of one shard
(:mod:`tasks.tfrecord`: no TensorFlow import), for Keras on the torch/JAX backends;
:func:`tfrecord_dataset` is the ``tf.data`` pipeline over the same index (TensorFlow
imported lazily, through :func:`carflow.frameworks.import_tensorflow`).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import tempfile
import threading
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from prefect import task

from carflow import keys
from carflow.errors import UserError
from carflow.imageio import open_checked
from carflow.manifest import DROPPED, KEPT
from carflow.storage import LocalStorage, Storage, StorageKeyError, open_storage
from tasks.retry import RETRY
from tasks.split import SPLITS
from tasks.tfrecord import decode_example, encode_example, read_records, write_records

#: the column training reads: the crop when there is one, else the photo
TRAIN_IMAGE = "train_image_id"
#: a kept row of the crop manifest without a crop (the crop stage should have dropped it)
NOT_CROPPED = "not_cropped"
#: bump when the record layout or the resize changes (part of every shard's content key)
TFRECORD_VERSION = "2"
#: decompression-bomb guard for the export decode
MAX_PIXELS = 40_000_000

#: the ``tf.train.Example`` features of one record: name → (dtype, meaning)
FEATURES: dict[str, tuple[str, str]] = {
    "image/encoded": ("string", "JPEG bytes resized at export (export.json `fit`, `image_size`; never upscaled)"),
    "image/height": ("int64", "height of the encoded JPEG"),
    "image/width": ("int64", "width of the encoded JPEG"),
    "image/class/text": ("string", "the row's label text before merges, year collapse and the ignore list "
                         "(make_model_year); export.json `labels` maps it to a class"),
    "image/attributes": ("string list", "multilabel tags (may be empty); export.json `label_names`"),
    "image/id": ("string", "train_image_id: the crop's id (crop_id), else the photo's (image_id)"),
    "image/photo_id": ("string", "image_id: the uncropped photo"),
    "image/listing_id": ("string", "listing_id"),
}


class ExportError(ValueError):
    """The manifest cannot be exported as asked (a dataset row without its train image,
    a class missing from classes.json); the message names the rows or the class."""


# ---------------------------------------------------------------------------------------
# which image a row trains on
# ---------------------------------------------------------------------------------------
def with_train_image_id(df: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """Add ``train_image_id`` = ``crop_id`` when the manifest has that column (the crop
    stage ran), else ``image_id``; returns (manifest, rows dropped).

    A crop manifest's kept rows all have a crop (the crop stage drops the others); any
    kept row that still lacks one is dropped here with reason ``not_cropped`` rather
    than trained on uncropped."""
    out = df.copy()
    if "crop_id" not in out.columns:
        out[TRAIN_IMAGE] = out["image_id"].astype(object)
        return out, 0
    crop = out["crop_id"].astype(object).where(out["crop_id"].notna(), None)
    bad = (out["status"] == KEPT).to_numpy() & crop.isna().to_numpy()
    if bad.any():
        if "reason" not in out.columns:
            out["reason"] = None
        out.loc[bad, "status"] = DROPPED
        out.loc[bad, "reason"] = NOT_CROPPED
    out[TRAIN_IMAGE] = crop
    return out, int(bad.sum())


def export_rows(df: pd.DataFrame) -> pd.DataFrame:
    """The dataset rows to export, one per (split, train image): columns ``split``,
    ``class_label``, ``train_image_id``, ``image_id``, ``listing_id``.

    Raises :class:`ExportError` when a dataset row has no train image (a crop manifest
    row without ``crop_id``)."""
    if TRAIN_IMAGE not in df.columns:
        if "crop_id" in df.columns:
            train = df["crop_id"]
        else:
            train = df["image_id"]
        df = df.assign(**{TRAIN_IMAGE: train})
    rows = df[df["split"].notna()]
    missing = rows[TRAIN_IMAGE].isna()
    if missing.any():
        ids = rows.loc[missing, "image_id"].head(5).tolist()
        raise ExportError(
            f"{int(missing.sum())} dataset row(s) have no {TRAIN_IMAGE} (a crop manifest row without crop_id; "
            f"the uncropped photo is never exported in its place), e.g. image_id {ids}"
        )
    cols = ["split", "class_label", TRAIN_IMAGE, "image_id", "listing_id"]
    return rows[cols].drop_duplicates(["split", TRAIN_IMAGE]).reset_index(drop=True)


# ---------------------------------------------------------------------------------------
# folders
# ---------------------------------------------------------------------------------------
def folder_key(split: str, class_label: str, image_id: str) -> str:
    """The seeds' layout: ``<split>/<class>/<image_id>.jpg`` (``image_id`` = the train image)."""
    return f"{split}/{class_label}/{image_id}.jpg"


def export_folders(df: pd.DataFrame, store: Storage, dest: Storage, max_workers: int = 4) -> dict[str, Any]:
    """Copy every dataset row's train image (the crop if there is one) from ``store`` to
    ``dest`` as ``<split>/<class>/<train_image_id>.jpg``; files already there are
    skipped (reruns copy only new images). Returns counts ``written``/``skipped``/
    ``missing`` and ``per_split`` (files present after the export)."""
    rows = export_rows(df).drop_duplicates(["split", "class_label", TRAIN_IMAGE])
    items = [
        (folder_key(s, c, i), i, s) for s, c, i in rows[["split", "class_label", TRAIN_IMAGE]].itertuples(index=False, name=None)
    ]

    def copy(item: tuple[str, str, str]) -> str:
        key, image_id, _ = item
        if dest.exists(key):
            return "skipped"
        try:
            data = store.get_image(image_id)
        except KeyError:
            return "missing"
        dest.put(key, data, content_type="image/jpeg")
        return "written"

    counts: dict[str, Any] = {"written": 0, "skipped": 0, "missing": 0}
    per_split = {s: 0 for s in SPLITS}
    with ThreadPoolExecutor(max_workers=max_workers) as pool:
        for (_, _, split), result in zip(items, pool.map(copy, items), strict=True):
            counts[result] += 1
            if result != "missing":
                per_split[split] += 1
    counts["per_split"] = per_split
    return counts


# ---------------------------------------------------------------------------------------
# TFRecord: resize, plan, write
# ---------------------------------------------------------------------------------------
def target_size(width: int, height: int, size: int, fit: str = "square") -> tuple[int, int]:
    """The exported (width, height); never larger than the input along either axis.

    ``fit="square"``: each side ``min(side, size)`` — size×size, what the training
    input pipeline resizes to anyway (as ``image_dataset_from_directory`` does), so
    only images smaller than that keep a side below ``size``. ``fit="shorter"``: the
    aspect ratio kept, the shorter side = ``size`` (room for crop augmentation)."""
    if fit == "square":
        return min(width, size), min(height, size)
    if fit != "shorter":
        raise ValueError(f"fit must be 'square' or 'shorter', got {fit!r}")
    short = min(width, height)
    if short <= size:
        return width, height
    if width <= height:
        return size, max(size, round(height * size / width))
    return max(size, round(width * size / height)), size


def resize_jpeg(data: bytes, size: int, quality: int = 90, fit: str = "square") -> tuple[bytes, int, int]:
    """``data`` as an RGB JPEG of :func:`target_size` → (bytes, width, height).

    Never upscales: an RGB JPEG already within the target comes back byte for byte (no
    second lossy encode). Big JPEGs are decoded in draft mode (DCT scaling) to the
    smallest scale still ≥ the target, then resized (Lanczos)."""
    im = open_checked(data, MAX_PIXELS)
    with im:
        w, h = im.size
        tw, th = target_size(w, h, size, fit)
        if (tw, th) == (w, h) and im.format == "JPEG" and im.mode == "RGB":
            return data, w, h
        if im.format == "JPEG" and im.mode in ("RGB", "L"):
            im.draft(im.mode, (tw, th))
        rgb = im.convert("RGB")
        if rgb.size != (tw, th):
            rgb = rgb.resize((tw, th), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        rgb.save(buf, "JPEG", quality=int(quality))
        return buf.getvalue(), tw, th


def _record_order(ids: pd.Series) -> np.ndarray:
    """Positions of ``ids`` ordered by a fixed hash (then the id): classes mixed in shards."""
    h = pd.util.hash_array(ids.to_numpy(dtype=object), hash_key="carflow-tfrecord", categorize=False)
    return np.lexsort((ids.to_numpy(dtype=object).astype(str), h))


# ---------------------------------------------------------------------------------------
# TFRecord: the rows, the shard plan
# ---------------------------------------------------------------------------------------
def _attributes(value: Any) -> tuple[str, ...]:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ()
    if isinstance(value, str):
        return (value,) if value else ()
    return tuple(sorted({str(v) for v in value}))


def tfrecord_rows(df: pd.DataFrame, classes: list[str]) -> pd.DataFrame:
    """The dataset rows as the export stores them, one per (split, train image):
    ``split``, ``train_image_id``, ``image_id``, ``listing_id``, ``class_label``,
    ``label_text``, ``attributes`` (tuple of str), ``first_seen``.

    ``label_text`` is the row's own label before merges, ignore list and year collapse
    (:func:`tasks.classes.base_labels` with ``merge_years=False``: ``make_model_year``),
    so a change of the class set never changes a shard. A train image with several
    rows (one photo in two listings) takes its earliest row. Raises
    :class:`ExportError` for a dataset row of a class not in ``classes``."""
    from tasks.classes import base_labels

    base = export_rows(df)  # raises for a dataset row without a train image
    rows = df[df["split"].notna()]
    if TRAIN_IMAGE not in rows.columns:
        rows = rows.assign(**{TRAIN_IMAGE: rows["crop_id"] if "crop_id" in rows.columns else rows["image_id"]})
    unknown = sorted(set(base["class_label"].dropna()) - set(classes))
    if unknown or base["class_label"].isna().any():
        raise ExportError(f"dataset rows of class(es) not in classes.json: {unknown or ['<none>']}")
    text = base_labels(rows, merge_years=False)
    out = pd.DataFrame({
        "split": rows["split"].astype(str).to_numpy(),
        TRAIN_IMAGE: rows[TRAIN_IMAGE].astype(str).to_numpy(),
        "image_id": rows["image_id"].astype(str).to_numpy(),
        "listing_id": rows["listing_id"].astype(object).where(rows["listing_id"].notna(), "").astype(str).to_numpy(),
        "class_label": rows["class_label"].astype(str).to_numpy(),
        "label_text": text.where(text.notna(), rows["class_label"]).astype(str).to_numpy(),
        "attributes": [_attributes(v) for v in rows["attributes"]] if "attributes" in rows.columns
        else [()] * len(rows),
        "first_seen": (pd.to_numeric(rows["first_seen"], errors="coerce").fillna(0).astype(np.int64).to_numpy()
                       if "first_seen" in rows.columns else np.zeros(len(rows), np.int64)),
    })
    out = out.sort_values(["split", "first_seen", TRAIN_IMAGE], kind="stable")
    return out.drop_duplicates(["split", TRAIN_IMAGE]).reset_index(drop=True)


def shard_content_key(rows: pd.DataFrame, size: int, fit: str, quality: int) -> str:
    """What a shard's bytes depend on: the format version, size, fit, quality and its
    rows (train image, label text, attributes, photo and listing ids), sorted by id."""
    h = hashlib.sha256()
    h.update(json.dumps({"format": TFRECORD_VERSION, "size": size, "fit": fit, "quality": quality},
                        sort_keys=True).encode())
    for r in rows.sort_values(TRAIN_IMAGE).itertuples(index=False):
        h.update(f"\n{r.train_image_id}\t{r.label_text}\t{','.join(r.attributes)}\t{r.image_id}\t{r.listing_id}".encode())
    return h.hexdigest()[:32]


def _members_table(rows: pd.DataFrame) -> bytes:
    """A shard's member rows as Parquet (the file that marks the shard complete)."""
    cols = ["split", TRAIN_IMAGE, "image_id", "listing_id", "label_text", "first_seen"]
    table = pa.Table.from_pandas(rows[cols].reset_index(drop=True), preserve_index=False)
    table = table.append_column("attributes", pa.array([list(a) for a in rows["attributes"]], pa.list_(pa.string())))
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def _read_members(dest: Storage, family: str, key: str) -> pd.DataFrame:
    df = pq.read_table(io.BytesIO(dest.get(keys.export_shard_key(family, key, "parquet")))).to_pandas()
    df["attributes"] = [tuple(a) for a in df["attributes"]]
    df["shard"] = key
    return df


def _previous_index(dest: Storage, family: str) -> dict[str, Any] | None:
    """The family's last index (what this export starts from), or None."""
    try:
        pointer = json.loads(dest.get(keys.export_family_pointer_key(family)))
        return json.loads(dest.get(pointer["index"]))
    except (StorageKeyError, KeyError, ValueError):
        return None


def _label_map(wanted: pd.DataFrame) -> tuple[dict[str, str], dict[str, str]]:
    """label text → class (the class most of that text's rows have, ties by name), and
    per train image the class where it differs (a label-conflict cluster relabelled)."""
    if wanted.empty:
        return {}, {}
    votes = wanted.groupby(["label_text", "class_label"]).size().rename("n").reset_index()
    votes = votes.sort_values(["label_text", "n", "class_label"], ascending=[True, False, True])
    labels = dict(votes.drop_duplicates("label_text")[["label_text", "class_label"]].itertuples(index=False, name=None))
    usual = wanted["label_text"].map(labels)
    odd = wanted[wanted["class_label"] != usual]
    return labels, dict(zip(odd[TRAIN_IMAGE], odd["class_label"], strict=True))


def _image_tuple(rows: pd.DataFrame) -> pd.Series:
    return rows["label_text"] + "\x00" + rows["attributes"].map(",".join)


def export_tfrecords(
    df: pd.DataFrame,
    store: Storage,
    classes_doc: Mapping[str, Any],
    size: int,
    shard_images: int = 2048,
    quality: int = 90,
    fit: str = "square",
    max_workers: int = 4,
    dest: Storage | None = None,
    version: str | None = None,
    task: str = "multiclass",
    refresh: bool = False,
) -> dict[str, Any]:
    """Export the dataset rows incrementally as content-keyed TFRecord shards, then the
    dataset version's index ``datasets/<version>/export.json`` (last: the pointer).

    ``store`` holds the images; shards and the index go to ``dest`` (default ``store``).
    ``version``: the dataset version (default ``classes_doc["version"]``).

    The export starts from its family's last index (same size, fit, quality): every
    shard there whose rows are all either wanted in the same split with the same label
    text and attributes, or not wanted at all, is reused as it is (rows not wanted are
    listed in the index's ``excluded``); the other rows — new images, and the rows of a
    shard that cannot be reused (a row moved split or changed text) — are cut into new
    shards by first appearance, together with the rows of the split's shards smaller
    than half a shard (so small tails do not pile up). So 1% new images re-encode about
    1%, and a class merge or an ignore-list change re-encodes nothing: the index maps
    label text → class. Missing or undecodable images are left out and listed, never
    fatal; an undecodable one is not retried, a missing one when it appears. ``refresh``
    starts from nothing: every row is encoded again, overwriting shards of the same key.

    Returns the index plus ``skipped`` (the same index was already there),
    ``encoded`` (images encoded now), ``written`` (= ``encoded``), ``shards_written``,
    ``shards_reused``, ``index_uri``."""
    if size < 1 or shard_images < 1:
        raise ValueError(f"size and shard_images must be ≥ 1, got {size}, {shard_images}")
    if task not in ("multiclass", "multilabel"):
        raise ValueError(f"task must be 'multiclass' or 'multilabel', got {task!r}")
    target_size(1, 1, 1, fit)  # a bad fit fails before any work
    dest = dest or store
    classes = list(classes_doc["classes"])
    version = version or str(classes_doc["version"])
    family = keys.export_family(size, fit, quality)
    wanted = tfrecord_rows(df, classes)
    label_names = sorted({a for attrs in wanted["attributes"] for a in attrs})
    if task == "multilabel" and not label_names:
        raise ExportError("task 'multilabel' needs an `attributes` column with tags on the dataset rows")

    # -- what the family's last index holds, and what of it can stay -----------------------
    prev = None if refresh else _previous_index(dest, family)
    prev_shards: list[tuple[str, dict[str, Any]]] = []
    if prev is not None:
        for split, info in prev.get("splits", {}).items():
            prev_shards += [(split, s) for s in info.get("shards", [])
                            if dest.exists(keys.export_shard_key(family, s["key"], "parquet"))]
    with ThreadPoolExecutor(max_workers=max(1, max_workers)) as pool:
        frames = list(pool.map(lambda s: _read_members(dest, family, s[1]["key"]), prev_shards))
    members = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
        {c: pd.Series(dtype=object) for c in ["split", TRAIN_IMAGE, "label_text", "attributes", "shard"]})
    want_key = wanted["split"] + "\x00" + wanted[TRAIN_IMAGE]
    want_val = dict(zip(want_key, _image_tuple(wanted), strict=True))
    wanted_ids = set(wanted[TRAIN_IMAGE])
    if not members.empty:
        mkey = members["split"] + "\x00" + members[TRAIN_IMAGE]
        mval = mkey.map(want_val)
        same = mval.notna() & (mval == _image_tuple(members))
        unwanted = mval.isna() & ~members[TRAIN_IMAGE].isin(wanted_ids)
        members["state"] = np.where(same, "keep", np.where(unwanted, "excluded", "bad"))
        bad_shards = set(members.loc[members["state"] == "bad", "shard"])
    else:
        members["state"] = pd.Series(dtype=object)
        bad_shards = set()
    valid = [(sp, s) for sp, s in prev_shards if s["key"] not in bad_shards]
    valid_keys = {s["key"] for _, s in valid}
    kept_members = members[members["shard"].isin(valid_keys) & (members["state"] == "keep")]
    covered = set(kept_members["split"] + "\x00" + kept_members[TRAIN_IMAGE])
    todo = wanted[~want_key.isin(covered)]

    # images that cannot be encoded: an undecodable one is never retried, a missing one once it is there
    problems: dict[str, list[str]] = {"missing": [], "undecodable": []}
    if prev is not None and not todo.empty:
        undecodable = set(prev.get("undecodable_ids", [])) & set(todo[TRAIN_IMAGE])
        missing = [i for i in set(prev.get("missing_ids", [])) & set(todo[TRAIN_IMAGE]) if not store.has_image(i)]
        problems["undecodable"] += sorted(undecodable)
        problems["missing"] += sorted(missing)
        todo = todo[~todo[TRAIN_IMAGE].isin(undecodable | set(missing))]

    # per split with new rows: reopen the small shards, cut the rows into shards by first appearance
    plans: list[tuple[str, pd.DataFrame]] = []
    keep_shards: list[tuple[str, dict[str, Any]]] = []
    todo_splits = set(todo["split"])
    for split, s in valid:
        if split in todo_splits and s["records"] < shard_images / 2:
            continue
        keep_shards.append((split, s))
    reopened = valid_keys - {s["key"] for _, s in keep_shards}
    if reopened:
        again = kept_members[kept_members["shard"].isin(reopened)]
        todo = pd.concat([todo, wanted[want_key.isin(again["split"] + "\x00" + again[TRAIN_IMAGE])]])
    for split in SPLITS:
        sub = todo[todo["split"] == split].sort_values(["first_seen", TRAIN_IMAGE], kind="stable")
        for i in range(0, len(sub), shard_images):
            plans.append((split, sub.iloc[i:i + shard_images]))

    # -- encode and write the new shards --------------------------------------------------
    def prepare(image_id: str) -> tuple[bytes, int, int] | str:
        try:
            data = store.get_image(image_id)
        except KeyError:
            return "missing"
        try:
            return resize_jpeg(data, size, quality, fit)
        except Exception:  # noqa: BLE001 - any undecodable image is a listed skip, not a failed export
            return "undecodable"

    new_shards: list[tuple[str, dict[str, Any]]] = []
    encoded = reused_planned = 0
    with tempfile.TemporaryDirectory(prefix="carflow-tfrecord-") as tmp, \
            ThreadPoolExecutor(max_workers=max(1, max_workers)) as pool:
        for split, rows in plans:
            planned = shard_content_key(rows, size, fit, quality)
            if not refresh and dest.exists(keys.export_shard_key(family, planned, "parquet")):  # an interrupted run's
                done = _read_members(dest, family, planned)
                new_shards.append((split, {"key": planned, "records": len(done),
                                           "bytes": _size_of(dest, keys.export_shard_key(family, planned))}))
                reused_planned += 1
                continue
            rows = rows.iloc[_record_order(rows[TRAIN_IMAGE])].reset_index(drop=True)
            results = list(pool.map(prepare, rows[TRAIN_IMAGE].tolist()))
            ok = [not isinstance(r, str) for r in results]
            for r, res in zip(rows[TRAIN_IMAGE], results, strict=True):
                if isinstance(res, str):
                    problems[res].append(r)
            rows = rows[ok].reset_index(drop=True)
            good = [r for r in results if not isinstance(r, str)]
            if rows.empty:
                continue
            key = shard_content_key(rows, size, fit, quality)
            path = Path(tmp) / f"{key}.tfrecord"
            write_records(path, (encode_example({
                "image/encoded": data, "image/height": h, "image/width": w,
                "image/class/text": r.label_text, "image/attributes": list(r.attributes),
                "image/id": r.train_image_id, "image/photo_id": r.image_id, "image/listing_id": r.listing_id,
            }) for r, (data, w, h) in zip(rows.itertuples(index=False), good, strict=True)))
            encoded += len(rows)
            payload = path.read_bytes()
            path.unlink()
            dest.put(keys.export_shard_key(family, key), payload, content_type="application/octet-stream")
            dest.put(keys.export_shard_key(family, key, "parquet"), _members_table(rows),
                     content_type="application/octet-stream")
            new_shards.append((split, {"key": key, "records": len(rows), "bytes": len(payload)}))

    # -- the index, last ------------------------------------------------------------------
    shards = keep_shards + new_shards
    in_index = {s["key"] for _, s in shards}
    excluded_rows = members[members["shard"].isin(in_index) & (members["state"] == "excluded")]
    excl_per_shard = excluded_rows.groupby("shard").size().to_dict()
    labels, overrides = _label_map(wanted)
    splits: dict[str, Any] = {}
    for split in SPLITS:
        entries = [{"key": s["key"], "file": keys.export_shard_key(family, s["key"]), "records": int(s["records"]),
                    "excluded": int(excl_per_shard.get(s["key"], 0)), "bytes": int(s["bytes"])}
                   for sp, s in shards if sp == split]
        splits[split] = {"count": sum(e["records"] - e["excluded"] for e in entries),
                         "records": sum(e["records"] for e in entries), "shards": entries}
    missing = sorted(set(problems["missing"]))
    undecodable = sorted(set(problems["undecodable"]))
    index: dict[str, Any] = {
        "format": "tfrecord",
        "format_version": TFRECORD_VERSION,
        "dataset_version": version,
        "classes_version": classes_doc.get("classes_version", classes_doc.get("version")),
        "classes": classes,
        "num_classes": len(classes),
        "task": task,
        "label_names": label_names,
        "image_size": size,
        "fit": fit,
        "resize": (
            "each side min(side, image_size)" if fit == "square" else "aspect kept, shorter side = image_size"
        ) + "; never upscaled; RGB JPEGs already within that are kept as stored",
        "jpeg_quality": quality,
        "shard_images": shard_images,
        "family": family,
        "features": {k: {"dtype": t, "meaning": m} for k, (t, m) in FEATURES.items()},
        "labels": dict(sorted(labels.items())),
        "overrides": dict(sorted(overrides.items())),
        "excluded": sorted(excluded_rows[TRAIN_IMAGE].unique().tolist()),
        "splits": splits,
        "count": sum(s["count"] for s in splits.values()),
        "missing": len(missing),
        "undecodable": len(undecodable),
        "missing_ids": missing,
        "undecodable_ids": undecodable,
    }
    index["content_key"] = hashlib.sha256(json.dumps(index, sort_keys=True).encode()).hexdigest()[:16]
    index_key = keys.export_index_key(version)
    try:
        old = json.loads(dest.get(index_key))
    except (StorageKeyError, ValueError):
        old = None
    skipped = old is not None and old.get("content_key") == index["content_key"]
    if skipped:
        index = old
    else:
        index["created_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        dest.put(index_key, json.dumps(index, indent=1).encode(), content_type="application/json")
    dest.put(keys.export_family_pointer_key(family),
             json.dumps({"version": version, "index": index_key, "content_key": index["content_key"]}).encode(),
             content_type="application/json")
    return {**index, "skipped": skipped, "encoded": encoded, "written": encoded,
            "shards_written": len(new_shards) - reused_planned, "shards_reused": len(keep_shards) + reused_planned,
            "index_uri": dest.uri(index_key)}


def _size_of(dest: Storage, key: str) -> int:
    if isinstance(dest, LocalStorage):
        return (dest.root / key).stat().st_size
    return len(dest.get(key))


def gc_export_shards(dest: Storage, dry_run: bool = False) -> dict[str, Any]:
    """Delete export shards (and their member tables) that no dataset version's
    ``export.json`` and no family pointer references. Run it when no export is in
    flight: a running export's new shards are referenced only once its index is
    written. Returns ``referenced``, ``deleted`` (keys) and ``dry_run``."""
    base = keys.registry_prefix("dataset") + "/"
    referenced: set[str] = set()
    for k in dest.list(base):
        if k.endswith("/export.json"):
            try:
                doc = json.loads(dest.get(k))
            except (StorageKeyError, ValueError):
                continue
            referenced |= {s["file"] for sp in doc.get("splits", {}).values() for s in sp.get("shards", [])}
    shard_root = f"{base}{keys.EXPORTS_DIR}/"
    deleted = []
    for k in list(dest.list(shard_root)):
        if "/shards/" not in k:
            continue
        stem = k.rsplit(".", 1)[0] + ".tfrecord"
        if stem not in referenced:
            deleted.append(k)
    if not dry_run:
        # members table first: a shard without one is incomplete, never reused half-deleted
        for k in sorted(deleted, key=lambda x: not x.endswith(".parquet")):
            dest.delete(k)
    return {"referenced": len(referenced), "deleted": deleted, "dry_run": dry_run}


# ---------------------------------------------------------------------------------------
# reading an export: the index and the TF-free reader
# ---------------------------------------------------------------------------------------
class ExportNotFound(UserError, FileNotFoundError):
    """No TFRecord export for that dataset version; the message says how to make one."""


def iter_examples(path: str | os.PathLike[str], verify: bool = True) -> Iterator[dict[str, Any]]:
    """The records of one shard file, read without TensorFlow: dicts with ``image``
    (JPEG bytes), ``label_text``, ``image_id`` (the train image), ``photo_id``,
    ``listing_id``, ``attributes`` (list of str), ``width``, ``height``."""
    for data in read_records(path, verify=verify):
        f = decode_example(data)
        text = _first_text(f)
        yield {
            "image": f["image/encoded"][0],
            "label_text": text("image/class/text"),
            "image_id": text("image/id"),
            "photo_id": text("image/photo_id"),
            "listing_id": text("image/listing_id"),
            "attributes": [a.decode() for a in f.get("image/attributes", [])],
            "width": int((f.get("image/width") or [0])[0]),
            "height": int((f.get("image/height") or [0])[0]),
        }


def _first_text(f: Mapping[str, list[Any]]):
    def text(name: str) -> str:
        v = f.get(name) or [b""]
        return v[0].decode()

    return text


def default_cache_dir() -> Path:
    return Path(os.environ.get("CARFLOW_TFRECORD_CACHE") or Path(tempfile.gettempdir()) / "carflow-tfrecord")


@dataclass
class ExportIndex:
    """One dataset version's export (``datasets/<version>/export.json``) in ``store``."""

    store: Storage
    key: str
    doc: dict[str, Any]
    cache_dir: Path | None = None
    _excluded: set[str] | None = field(default=None, repr=False)
    _class_index: dict[str, int] | None = field(default=None, repr=False)

    @property
    def version(self) -> str:
        return str(self.doc["dataset_version"])

    @property
    def classes(self) -> list[str]:
        return list(self.doc["classes"])

    @property
    def size(self) -> int:
        return int(self.doc["image_size"])

    @property
    def splits(self) -> list[str]:
        return [s for s in SPLITS if s in self.doc["splits"]] + sorted(set(self.doc["splits"]) - set(SPLITS))

    @property
    def task(self) -> str:
        return str(self.doc.get("task", "multiclass"))

    @property
    def label_names(self) -> list[str]:
        return list(self.doc.get("label_names", []))

    @property
    def excluded(self) -> set[str]:
        if self._excluded is None:
            self._excluded = set(self.doc.get("excluded", []))
        return self._excluded

    @property
    def overrides(self) -> dict[str, str]:
        """train image id → class, where it differs from its label text's class."""
        return dict(self.doc.get("overrides", {}))

    def uri(self) -> str:
        return self.store.uri(self.key)

    def count(self, split: str) -> int:
        """Rows this version trains on in ``split`` (records minus excluded)."""
        return int(self._split(split)["count"])

    def shards(self, split: str) -> list[dict[str, Any]]:
        return list(self._split(split)["shards"])

    def _split(self, split: str) -> dict[str, Any]:
        try:
            return self.doc["splits"][split]
        except KeyError:
            raise KeyError(f"split {split!r} not in the export (has {self.splits})") from None

    def label_index(self, label_text: str) -> int | None:
        """The class index of a record's label text; None = this version does not train
        on that text (an ignored or dropped class)."""
        if self._class_index is None:
            self._class_index = {c: i for i, c in enumerate(self.doc["classes"])}
        cls = self.doc["labels"].get(label_text)
        return None if cls is None else self._class_index.get(cls)

    def label_of(self, example: Mapping[str, Any]) -> int | None:
        """The class index of one record (:func:`iter_examples`): None when this version
        excludes the image; a per-image override (label-conflict relabel) wins over
        the label text."""
        image_id = example["image_id"]
        if image_id in self.excluded:
            return None
        cls = self.doc.get("overrides", {}).get(image_id)
        if cls is not None:
            if self._class_index is None:
                self.label_index("")
            return self._class_index.get(cls)  # type: ignore[union-attr]
        return self.label_index(example["label_text"])

    def targets(self, example: Mapping[str, Any]) -> np.ndarray:
        """Multilabel: the record's ``attributes`` as a multi-hot float32 vector over
        :attr:`label_names`."""
        names = {n: i for i, n in enumerate(self.label_names)}
        out = np.zeros(len(names), np.float32)
        for a in example["attributes"]:
            if a in names:
                out[names[a]] = 1.0
        return out

    def files(self, split: str, max_workers: int = 8) -> list[str]:
        """Local paths of ``split``'s shard files: read in place from local storage,
        downloaded once into ``cache_dir/<family>/`` (default ``$CARFLOW_TFRECORD_CACHE``
        or ``<tmp>/carflow-tfrecord``) from S3. Shard names are content keys, so a
        cached file of the right size is the right file and is not fetched again."""
        shards = self.shards(split)
        if isinstance(self.store, LocalStorage):
            return [str(self.store.root / s["file"]) for s in shards]
        root = Path(self.cache_dir or default_cache_dir()) / str(self.doc["family"])

        def fetch(entry: Mapping[str, Any]) -> str:
            path = root / f"{entry['key']}.tfrecord"
            if not (path.exists() and path.stat().st_size == entry["bytes"]):
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.part")
                tmp.write_bytes(self.store.get(entry["file"]))
                os.replace(tmp, path)
            return str(path)

        with ThreadPoolExecutor(max_workers) as pool:
            return list(pool.map(fetch, shards))

    def examples(self, split: str, verify: bool = True) -> Iterator[dict[str, Any]]:
        """Every record this version trains on in ``split`` (excluded ones skipped), as
        :func:`iter_examples` dicts plus ``label`` (the class index; for a multilabel
        export the multi-hot ``targets``)."""
        for path in self.files(split):
            for ex in iter_examples(path, verify):
                label = self.label_of(ex)
                if label is None and (self.task == "multiclass" or ex["image_id"] in self.excluded):
                    continue
                ex["label"] = self.targets(ex) if self.task == "multilabel" else label
                yield ex


def open_export(
    store_or_uri: Storage | str | os.PathLike[str] | None,
    dataset_version: Any = "latest",
    cache_dir: str | os.PathLike[str] | None = None,
) -> ExportIndex:
    """The export of a dataset version: ``store_or_uri`` is the storage (or its URI /
    path) holding ``datasets/``, or the URI / path of an ``export.json`` itself;
    ``dataset_version`` is ``latest``, a version id or a
    :class:`carflow.registry.Version`. Raises :class:`ExportNotFound` (one line,
    naming the command that makes it) when there is none."""
    from carflow.registry import Registry, RegistryError, Version

    cache = Path(cache_dir) if cache_dir else None
    if isinstance(store_or_uri, (str, os.PathLike)) and os.fspath(store_or_uri).endswith(".json"):
        head, _, name = os.fspath(store_or_uri).rstrip("/").rpartition("/")
        store = open_storage(head or ".")
        try:
            return ExportIndex(store, name, json.loads(store.get(name)), cache)
        except StorageKeyError:
            raise ExportNotFound(f"{store.uri(name)} does not exist: run `carflow dataset --tfrecord`") from None
    if isinstance(dataset_version, Version):
        store, key = dataset_version.storage, dataset_version.key("export.json")
        version = dataset_version.version
    else:
        store = open_storage(store_or_uri)
        spec = str(dataset_version or "latest")
        try:
            v = Registry(store).resolve("dataset", spec)
            store, key, version = v.storage, v.key("export.json"), v.version
        except RegistryError:
            version = spec
            if spec == "latest":  # a classes pointer without a registry meta.json yet
                try:
                    version = json.loads(store.get(keys.pointer_key("dataset")))["version"]
                except (StorageKeyError, KeyError, ValueError):
                    raise ExportNotFound(f"no dataset in {store.uri(keys.registry_prefix('dataset'))}: "
                                         "run `carflow dataset --tfrecord`") from None
            key = keys.export_index_key(version)
    try:
        doc = json.loads(store.get(key))
    except StorageKeyError:
        raise ExportNotFound(f"dataset version {version} has no TFRecord export ({store.uri(key)}): "
                             "run `carflow dataset --tfrecord`") from None
    return ExportIndex(store, key, doc, cache)


# ---------------------------------------------------------------------------------------
# TFRecord through tf.data (TensorFlow imported lazily)
# ---------------------------------------------------------------------------------------
def _tf():
    from carflow.frameworks import import_tensorflow

    return import_tensorflow()


def local_shards(uri: str | os.PathLike[str] | Storage, split: str, cache_dir: str | os.PathLike[str] | None = None,
                 dataset_version: Any = "latest") -> tuple[list[str], dict[str, Any]]:
    """Local paths of ``split``'s shards and the index document (:meth:`ExportIndex.files`)."""
    index = open_export(uri, dataset_version, cache_dir)
    return index.files(split), index.doc


def tfrecord_dataset(
    uri: str | os.PathLike[str] | Storage | ExportIndex,
    split: str,
    size: int | None = None,
    batch_size: int = 32,
    shuffle: bool = False,
    seed: int | None = None,
    with_ids: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
    drop_remainder: bool = False,
    dataset_version: Any = "latest",
):
    """``tf.data.Dataset`` of ``(uint8 images [b, size, size, 3], labels [b])`` (plus
    the train image ids with ``with_ids``) from an export's ``split``: int64 class
    indices, or float32 multi-hot targets for a multilabel export. Excluded records are
    filtered out; labels come from the index (label text → class, per-image overrides).

    ``size`` defaults to the export's ``image_size``; images are resized to size×size
    (bilinear, as ``image_dataset_from_directory`` does). Shards are interleaved and
    decoded in parallel; with ``shuffle`` the shard order and a record buffer are
    shuffled (``seed``), else the order is the export's (deterministic)."""
    tf = _tf()
    index = uri if isinstance(uri, ExportIndex) else open_export(uri, dataset_version, cache_dir)
    files = index.files(split)
    size = int(size or index.size)
    cls = {c: i for i, c in enumerate(index.classes)}
    texts = list(index.doc["labels"])

    def table(k: list[str], v: list[int], default: int):
        if not k:
            k, v = ["\x00"], [default]
        init = tf.lookup.KeyValueTensorInitializer(tf.constant(k, tf.string), tf.constant(v, tf.int64))
        return tf.lookup.StaticHashTable(init, default_value=default)

    text_table = table(texts, [cls[index.doc["labels"][t]] for t in texts], -1)
    # per image: an override's class, or -2 = excluded; -1 = use the text
    per_image = {**{i: cls[c] for i, c in index.overrides.items()}, **{i: -2 for i in index.excluded}}
    id_table = table(list(per_image), list(per_image.values()), -1)
    multilabel = index.task == "multilabel"
    names = index.label_names
    attr_table = table(names, list(range(len(names))), -1)
    spec = {
        "image/encoded": tf.io.FixedLenFeature([], tf.string),
        "image/class/text": tf.io.FixedLenFeature([], tf.string),
        "image/id": tf.io.FixedLenFeature([], tf.string),
        "image/attributes": tf.io.VarLenFeature(tf.string),
    }

    def parse(serialized):
        ex = tf.io.parse_single_example(serialized, spec)
        img = tf.io.decode_jpeg(ex["image/encoded"], channels=3)
        img = tf.saturate_cast(tf.round(tf.image.resize(img, (size, size))), tf.uint8)
        per = id_table.lookup(ex["image/id"])
        label = tf.where(per == -1, text_table.lookup(ex["image/class/text"]), per)
        if multilabel:
            idx = attr_table.lookup(ex["image/attributes"].values)
            idx = tf.boolean_mask(idx, idx >= 0)
            target = tf.minimum(tf.reduce_sum(tf.one_hot(idx, len(names), dtype=tf.float32), axis=0), 1.0)
            target = tf.ensure_shape(target, [len(names)])
            keep = per != -2
            return img, target, ex["image/id"], keep
        return img, label, ex["image/id"], label >= 0

    auto = tf.data.AUTOTUNE
    ds = tf.data.Dataset.from_tensor_slices(tf.constant(files or [""], dtype=tf.string))
    if not files:
        ds = ds.take(0)
    if shuffle:
        ds = ds.shuffle(max(1, len(files)), seed=seed, reshuffle_each_iteration=True)
    ds = ds.interleave(
        lambda f: tf.data.TFRecordDataset(f, buffer_size=8 << 20),
        cycle_length=max(1, min(len(files), 8)),
        num_parallel_calls=auto,
        deterministic=not shuffle,
    )
    if shuffle:
        ds = ds.shuffle(max(1024, 8 * batch_size), seed=seed, reshuffle_each_iteration=True)
    ds = ds.map(parse, num_parallel_calls=auto, deterministic=not shuffle)
    ds = ds.filter(lambda img, lab, i, keep: keep)
    if with_ids:
        ds = ds.map(lambda img, lab, i, keep: (img, lab, i))
    else:
        ds = ds.map(lambda img, lab, i, keep: (img, lab))
    return ds.batch(batch_size, drop_remainder=drop_remainder).prefetch(auto)


# ---------------------------------------------------------------------------------------
# Prefect tasks (thin)
# ---------------------------------------------------------------------------------------
@task(name="export-folders", **RETRY.io())
def export_folders_task(df: pd.DataFrame, storage: str | None, dest_uri: str, max_workers: int = 4) -> dict[str, Any]:
    return export_folders(df, open_storage(storage), open_storage(dest_uri), max_workers)


@task(name="export-tfrecords", **RETRY.io())
def export_tfrecords_task(
    df: pd.DataFrame,
    storage: str | None,
    dest_uri: str | None,
    classes_doc: dict[str, Any],
    size: int,
    shard_images: int = 2048,
    quality: int = 90,
    fit: str = "square",
    max_workers: int = 4,
    version: str | None = None,
    task: str = "multiclass",
    refresh: bool = False,
) -> dict[str, Any]:
    store = open_storage(storage)
    return export_tfrecords(
        df, store, classes_doc, size, shard_images, quality, fit, max_workers,
        dest=open_storage(dest_uri) if dest_uri else store, version=version, task=task, refresh=refresh,
    )
