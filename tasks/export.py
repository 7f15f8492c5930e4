"""Dataset exports: the files training reads.

Both exports read the dataset manifest's *dataset rows* (``split`` set) and write the
image each row trains on, ``train_image_id`` (:func:`with_train_image_id`): the crop
(``crop_id``) when the dataset was built from the crop manifest, else the photo
(``image_id``). A dataset row without a train image is an error (:class:`ExportError`),
never a silent fallback to the uncropped photo.

* **Folders** (:func:`export_folders`): the seeds' layout
  ``<split>/<class>/<train_image_id>.jpg``, bytes as stored, to a local folder or an
  ``s3://`` prefix; files already there are skipped, so a rerun copies only new images.
* **TFRecord** (:func:`export_tfrecords`), the training format: per split,
  ``<split>/<split>-00000-of-000NN.tfrecord`` shards of ``tf.train.Example`` records
  (:data:`FEATURES`: the JPEG resized at export — by default to ``size``×``size``,
  the input training resizes to anyway, or with ``fit="shorter"`` to a shorter side of
  ``size`` keeping the aspect; never upscaled, JPEGs already small enough kept byte for
  byte —, the label = index of the class in ``classes.json``'s ordered list, the class
  name, the train image id, the photo id and the listing id) and ``meta.json`` (classes version and ordered class
  list, image size, feature spec, per split the shards with their record counts).
  Records are ordered by a hash of their image id, so every shard mixes the classes.
  Shards are written to a local temp file, then put through :mod:`carflow.storage`
  (local or S3); ``meta.json`` is written last and carries a content key (classes
  version, class list, rows, labels, size, quality, shard size): an export whose
  meta.json has the same key and all of whose shards exist is not redone.
  ``bench/dataset_read.py`` measured this format against the seeds' folders read with
  ``image_dataset_from_directory`` (see the README): the decode of the stored JPEG is
  the cost that remains, so the square size×size JPEGs read fastest (and are the
  smallest); uint8 arrays skip the decode but take ~5–14× the bytes.

:func:`tfrecord_dataset` reads an export back as a ``tf.data.Dataset`` of
``(uint8 images [batch, size, size, 3], int64 labels [batch])``; shards of an ``s3://``
export are downloaded to a local cache first (TensorFlow has no S3 file system).

TensorFlow is imported inside the functions that need it, through
:func:`carflow.frameworks.import_tensorflow`.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import tempfile
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image
from prefect import task

from carflow.imageio import open_checked
from carflow.manifest import DROPPED, KEPT
from carflow.storage import LocalStorage, Storage, StorageKeyError, open_storage
from tasks.split import SPLITS

#: the column training reads: the crop when there is one, else the photo
TRAIN_IMAGE = "train_image_id"
#: a kept row of the crop manifest without a crop (the crop stage should have dropped it)
NOT_CROPPED = "not_cropped"
META_KEY = "meta.json"
#: bump when the record layout or the resize changes (part of the content key)
TFRECORD_VERSION = "1"
#: decompression-bomb guard for the export decode
MAX_PIXELS = 40_000_000

#: the ``tf.train.Example`` features of one record: name → (dtype, meaning)
FEATURES: dict[str, tuple[str, str]] = {
    "image/encoded": ("string", "JPEG bytes resized at export (meta.json `fit`, `image_size`; never upscaled)"),
    "image/height": ("int64", "height of the encoded JPEG"),
    "image/width": ("int64", "width of the encoded JPEG"),
    "image/class/label": ("int64", "index of the class in classes.json's `classes`"),
    "image/class/text": ("string", "the class name"),
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


def shard_name(split: str, index: int, count: int) -> str:
    """``<split>/<split>-00000-of-000NN.tfrecord``"""
    return f"{split}/{split}-{index:05d}-of-{count:05d}.tfrecord"


def _record_order(ids: pd.Series) -> np.ndarray:
    """Positions of ``ids`` ordered by a fixed hash (then the id): classes mixed in shards."""
    h = pd.util.hash_array(ids.to_numpy(dtype=object), hash_key="carflow-tfrecord", categorize=False)
    return np.lexsort((ids.to_numpy(dtype=object).astype(str), h))


def plan_tfrecords(
    df: pd.DataFrame, classes: list[str], shard_images: int
) -> dict[str, list[pd.DataFrame]]:
    """Per split, the rows of each shard (hash order, shards of ≤ ``shard_images``
    rows, sizes within one of each other), with a ``label`` column = class index."""
    rows = export_rows(df)
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(rows["class_label"].dropna()) - set(index))
    if unknown or rows["class_label"].isna().any():
        raise ExportError(f"dataset rows of class(es) not in classes.json: {unknown or ['<none>']}")
    rows["label"] = rows["class_label"].map(index).astype(np.int64)
    plan: dict[str, list[pd.DataFrame]] = {}
    for split in SPLITS:
        sub = rows[rows["split"] == split].reset_index(drop=True)
        if sub.empty:
            continue
        sub = sub.iloc[_record_order(sub[TRAIN_IMAGE])].reset_index(drop=True)
        n = math.ceil(len(sub) / shard_images)
        plan[split] = [sub.iloc[idx].reset_index(drop=True) for idx in np.array_split(np.arange(len(sub)), n)]
    return plan


def content_key(plan: Mapping[str, list[pd.DataFrame]], classes_doc: Mapping[str, Any], size: int, quality: int,
                shard_images: int, fit: str = "square") -> str:
    """What the export's bytes depend on: format version, classes version and list,
    size, fit, quality, shard size and every shard's (image, photo, listing, label) rows."""
    h = hashlib.sha256()
    head = {"format": TFRECORD_VERSION, "classes_version": classes_doc.get("version"),
            "classes": list(classes_doc["classes"]), "size": size, "fit": fit, "quality": quality,
            "shard_images": shard_images}
    h.update(json.dumps(head, sort_keys=True).encode())
    for split in sorted(plan):
        for shard in plan[split]:
            h.update(f"\n[{split}]".encode())
            cols = shard[[TRAIN_IMAGE, "image_id", "listing_id", "label"]].astype(str)
            h.update("\n".join("\t".join(r) for r in cols.itertuples(index=False, name=None)).encode())
    return h.hexdigest()[:16]


def read_meta(dest: Storage) -> dict[str, Any] | None:
    """``meta.json`` of an export (None when there is none)."""
    try:
        return json.loads(dest.get(META_KEY))
    except StorageKeyError:
        return None


def _complete(dest: Storage, meta: Mapping[str, Any]) -> bool:
    return all(dest.exists(s["file"]) for sp in meta["splits"].values() for s in sp["shards"])


def _example(tf, data: bytes, width: int, height: int, row: Any):
    def b(v: str | bytes):
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[v if isinstance(v, bytes) else str(v).encode()]))

    def i(v: int):
        return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(v)]))

    return tf.train.Example(features=tf.train.Features(feature={
        "image/encoded": b(data),
        "image/height": i(height),
        "image/width": i(width),
        "image/class/label": i(row.label),
        "image/class/text": b(row.class_label),
        "image/id": b(row.train_image_id),
        "image/photo_id": b(row.image_id),
        "image/listing_id": b(row.listing_id),
    }))


def export_tfrecords(
    df: pd.DataFrame,
    store: Storage,
    dest: Storage,
    classes_doc: Mapping[str, Any],
    size: int,
    shard_images: int = 2048,
    quality: int = 90,
    fit: str = "square",
    max_workers: int = 4,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write the dataset rows' train images as TFRecord shards plus ``meta.json`` to
    ``dest``, each resized by :func:`resize_jpeg` (``size``, ``fit``, ``quality``); returns the meta document with ``skipped`` (True when an identical export
    was already there) and ``written`` (records written now); meta.json itself holds
    ``count`` and, per split, ``count`` and the shards (``file``, ``count``, ``bytes``),
    and the ``missing``/``undecodable`` counts with the first 1000 ids of each.

    ``classes_doc``: the ``classes.json`` document (its ``classes`` order gives the
    labels). Images missing from ``store`` or that do not decode are left out and
    counted (their ids in meta.json), never fatal. Shards of an earlier export with
    another content that the new one does not overwrite are deleted after the new
    meta.json is written."""
    if size < 1 or shard_images < 1:
        raise ValueError(f"size and shard_images must be ≥ 1, got {size}, {shard_images}")
    target_size(1, 1, 1, fit)  # a bad fit fails before any work
    classes = list(classes_doc["classes"])
    plan = plan_tfrecords(df, classes, shard_images)
    key = content_key(plan, classes_doc, size, quality, shard_images, fit)
    old = read_meta(dest)
    if not overwrite and old is not None and old.get("content_key") == key and _complete(dest, old):
        return {**old, "skipped": True, "written": 0}

    tf = _tf()

    def prepare(image_id: str) -> tuple[bytes, int, int] | str:
        try:
            data = store.get_image(image_id)
        except KeyError:
            return "missing"
        try:
            return resize_jpeg(data, size, quality, fit)
        except Exception:  # noqa: BLE001 - any undecodable image is a counted skip, not a failed export
            return "undecodable"

    splits: dict[str, Any] = {}
    problems: dict[str, list[str]] = {"missing": [], "undecodable": []}
    written = 0
    with tempfile.TemporaryDirectory(prefix="carflow-tfrecord-") as tmp, ThreadPoolExecutor(max_workers) as pool:
        for split, shards in plan.items():
            entries = []
            for i, shard in enumerate(shards):
                name = shard_name(split, i, len(shards))
                path = Path(tmp) / name.replace("/", "_")
                count = 0
                with tf.io.TFRecordWriter(str(path)) as writer:
                    results = pool.map(prepare, shard[TRAIN_IMAGE].tolist())
                    for row, result in zip(shard.itertuples(index=False), results, strict=True):
                        if isinstance(result, str):
                            problems[result].append(row.train_image_id)
                            continue
                        data, w, h = result
                        writer.write(_example(tf, data, w, h, row).SerializeToString())
                        count += 1
                payload = path.read_bytes()
                path.unlink()
                dest.put(name, payload, content_type="application/octet-stream")
                entries.append({"file": name, "count": count, "bytes": len(payload)})
                written += count
            splits[split] = {"count": sum(e["count"] for e in entries), "shards": entries}
    splits = {s: splits.get(s, {"count": 0, "shards": []}) for s in SPLITS}  # an empty split reads as empty

    meta = {
        "format": "tfrecord",
        "format_version": TFRECORD_VERSION,
        "content_key": key,
        "classes_version": classes_doc.get("version"),
        "classes": classes,
        "num_classes": len(classes),
        "image_size": size,
        "fit": fit,
        "resize": (
            "each side min(side, image_size)" if fit == "square" else "aspect kept, shorter side = image_size"
        ) + "; never upscaled; RGB JPEGs already within that are kept as stored",
        "jpeg_quality": quality,
        "shard_images": shard_images,
        "features": {k: {"dtype": t, "meaning": m} for k, (t, m) in FEATURES.items()},
        "splits": splits,
        "count": written,
        "missing": len(problems["missing"]),
        "undecodable": len(problems["undecodable"]),
        # the first 1000 of each, to look them up in storage
        "missing_ids": problems["missing"][:1000],
        "undecodable_ids": problems["undecodable"][:1000],
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    dest.put(META_KEY, json.dumps(meta, indent=2).encode(), content_type="application/json")
    if old is not None:
        keep = {s["file"] for sp in splits.values() for s in sp["shards"]}
        for sp in old.get("splits", {}).values():
            for s in sp.get("shards", []):
                if s["file"] not in keep:
                    dest.delete(s["file"])
    return {**meta, "skipped": False, "written": written}


# ---------------------------------------------------------------------------------------
# TFRecord: read
# ---------------------------------------------------------------------------------------
def _tf():
    from carflow.frameworks import import_tensorflow

    return import_tensorflow()


def default_cache_dir() -> Path:
    return Path(os.environ.get("CARFLOW_TFRECORD_CACHE") or Path(tempfile.gettempdir()) / "carflow-tfrecord")


def local_shards(uri: str | os.PathLike[str] | Storage, split: str, cache_dir: str | os.PathLike[str] | None = None,
                 max_workers: int = 8) -> tuple[list[str], dict[str, Any]]:
    """Local paths of ``split``'s shards (listed by meta.json) and the meta document.

    A local export is read in place; the shards of an ``s3://`` export are downloaded
    to ``cache_dir/<content_key>/`` (default ``$CARFLOW_TFRECORD_CACHE`` or
    ``<tmp>/carflow-tfrecord``), once: a file of the right size is not fetched again."""
    store = open_storage(uri)
    meta = read_meta(store)
    if meta is None:
        raise FileNotFoundError(f"{store.uri(META_KEY)}: no TFRecord export there")
    if split not in meta["splits"]:
        raise KeyError(f"split {split!r} not in the export (has {sorted(meta['splits'])})")
    shards = meta["splits"][split]["shards"]
    if isinstance(store, LocalStorage):
        return [str(store.root / s["file"]) for s in shards], meta
    root = Path(cache_dir or default_cache_dir()) / meta["content_key"]

    def fetch(entry: Mapping[str, Any]) -> str:
        path = root / entry["file"]
        if not (path.exists() and path.stat().st_size == entry["bytes"]):
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".part")
            tmp.write_bytes(store.get(entry["file"]))
            os.replace(tmp, path)
        return str(path)

    with ThreadPoolExecutor(max_workers) as pool:
        return list(pool.map(fetch, shards)), meta


def parse_record(serialized, size: int, with_ids: bool = False):
    """One serialized record → (uint8 image [size, size, 3], int64 label[, id])."""
    tf = _tf()
    spec = {
        "image/encoded": tf.io.FixedLenFeature([], tf.string),
        "image/class/label": tf.io.FixedLenFeature([], tf.int64),
    }
    if with_ids:
        spec["image/id"] = tf.io.FixedLenFeature([], tf.string)
    ex = tf.io.parse_single_example(serialized, spec)
    img = tf.io.decode_jpeg(ex["image/encoded"], channels=3)
    img = tf.image.resize(img, (size, size))
    img = tf.saturate_cast(tf.round(img), tf.uint8)
    if with_ids:
        return img, ex["image/class/label"], ex["image/id"]
    return img, ex["image/class/label"]


def tfrecord_dataset(
    uri: str | os.PathLike[str] | Storage,
    split: str,
    size: int | None = None,
    batch_size: int = 32,
    shuffle: bool = False,
    seed: int | None = None,
    with_ids: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
    drop_remainder: bool = False,
):
    """``tf.data.Dataset`` of ``(uint8 images [b, size, size, 3], int64 labels [b])``
    (plus the train image ids with ``with_ids``) from an export's ``split``.

    ``size`` defaults to the export's ``image_size``; images are resized to size×size
    (bilinear, as ``image_dataset_from_directory`` does). Shards are interleaved and
    decoded in parallel; with ``shuffle`` the shard order and a record buffer are
    shuffled (``seed``), else the order is the export's (deterministic)."""
    tf = _tf()
    files, meta = local_shards(uri, split, cache_dir)
    size = int(size or meta["image_size"])
    auto = tf.data.AUTOTUNE
    ds = tf.data.Dataset.from_tensor_slices(tf.constant(files, dtype=tf.string))
    if shuffle:
        ds = ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
    ds = ds.interleave(
        lambda f: tf.data.TFRecordDataset(f, buffer_size=8 << 20),
        cycle_length=max(1, min(len(files), 8)),
        num_parallel_calls=auto,
        deterministic=not shuffle,
    )
    if shuffle:
        ds = ds.shuffle(max(1024, 8 * batch_size), seed=seed, reshuffle_each_iteration=True)
    ds = ds.map(lambda s: parse_record(s, size, with_ids), num_parallel_calls=auto, deterministic=not shuffle)
    return ds.batch(batch_size, drop_remainder=drop_remainder).prefetch(auto)


# ---------------------------------------------------------------------------------------
# Prefect tasks (thin)
# ---------------------------------------------------------------------------------------
@task(name="export-folders", retries=2, retry_delay_seconds=5)
def export_folders_task(df: pd.DataFrame, storage: str | None, dest_uri: str, max_workers: int = 4) -> dict[str, Any]:
    return export_folders(df, open_storage(storage), open_storage(dest_uri), max_workers)


@task(name="export-tfrecords", retries=1, retry_delay_seconds=5)
def export_tfrecords_task(
    df: pd.DataFrame,
    storage: str | None,
    dest_uri: str,
    classes_doc: dict[str, Any],
    size: int,
    shard_images: int = 2048,
    quality: int = 90,
    fit: str = "square",
    max_workers: int = 4,
) -> dict[str, Any]:
    return export_tfrecords(
        df, open_storage(storage), open_storage(dest_uri), classes_doc, size, shard_images, quality, fit, max_workers
    )
