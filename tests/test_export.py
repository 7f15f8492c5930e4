"""Dataset exports (tasks/export.py): crops, not photos; folders and TFRecord shards,
local and S3; the TFRecord reader; and the dataset flow with the TFRecord export on."""

from __future__ import annotations

import io
import json
import re

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from carflow.manifest import (
    INGEST_SCHEMA,
    from_pandas,
    manifest_key,
    read_manifest,
    to_pandas,
    write_manifest,
)
from carflow.storage import image_key, open_storage
from tasks.export import (
    NOT_CROPPED,
    TRAIN_IMAGE,
    ExportError,
    export_folders,
    export_rows,
    export_tfrecords,
    local_shards,
    resize_jpeg,
    target_size,
    tfrecord_dataset,
    with_train_image_id,
)
from tasks.split import SPLITS

#: class → crop colour; the uncropped photo is the crop pasted on a grey frame
COLORS = {"volkswagen_golf": (200, 30, 30), "bmw_3-series": (30, 40, 200), "ford_ranger": (30, 170, 40)}
GREY = (128, 128, 128)
SIZE = 32


def _jpeg(img: Image.Image, quality: int = 92) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _crop_image(color, w: int, h: int, rng) -> Image.Image:
    arr = np.clip(np.array(color, float)[None, None, :] + rng.normal(0, 6, (h, w, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(arr)


def crop_manifest(store, n_listings: int = 12, photos: int = 3) -> tuple[pd.DataFrame, dict[str, bytes]]:
    """A crop-stage-like manifest: clean-like rows (photo = the crop on a grey 200×150
    frame) with ``crop_id`` pointing at the smaller crop JPEG; plus one kept row the
    crop stage missed (no crop_id) and one ``no_vehicle`` row. Returns (df, crops)."""
    rng = np.random.default_rng(0)
    classes = list(COLORS)
    rows, crops = [], {}
    for lst in range(n_listings):
        cls = classes[lst % len(classes)]
        make, model = cls.split("_")
        for p in range(photos):
            w, h = 64 + 8 * p + lst, 48 + 4 * p
            crop = _crop_image(COLORS[cls], w, h, rng)
            photo = Image.new("RGB", (200, 150), GREY)
            photo.paste(crop, (30, 40))
            photo_bytes, crop_bytes = _jpeg(photo), _jpeg(crop)
            image_id, crop_id = store.put_image(photo_bytes), store.put_image(crop_bytes)
            crops[crop_id] = crop_bytes
            rows.append({
                "image_id": image_id, "listing_id": f"t:{lst:03d}", "site": "t", "url": f"http://t/{lst}/{p}.jpg",
                "photo_index": p, "make": make, "model": model, "year": 2017, "label": f"{cls}_2017",
                "make_raw": make, "model_raw": model, "raw_key": image_key(image_id), "bytes": len(photo_bytes),
                "content_type": "image/jpeg", "source": "crawl", "crawl_id": "c1", "first_seen": lst * 10 + p,
                "status": "kept", "reason": None, "dup_cluster": image_id, "crop_id": crop_id,
                "source_id": image_id, "width": 200, "height": 150, "fix_actions": [], "quality_flags": [],
                "phash": None, "dhash": None, "pixel_hash": None, "label_conflict": False,
            })
    extra = []
    for i, (status, reason) in enumerate([("kept", None), ("dropped", "no_vehicle")]):
        photo_bytes = _jpeg(Image.new("RGB", (200, 150), (10 * i, 20, 30)))
        image_id = store.put_image(photo_bytes)
        extra.append({**rows[0], "image_id": image_id, "listing_id": f"t:9{i:02d}", "photo_index": 0,
                      "raw_key": image_key(image_id), "bytes": len(photo_bytes), "dup_cluster": image_id,
                      "source_id": image_id, "status": status, "reason": reason, "crop_id": None})
    return pd.DataFrame(rows + extra), crops


def with_splits(df: pd.DataFrame) -> pd.DataFrame:
    """Classes and a listing-level split without the flow (for the task-level tests)."""
    out, _ = with_train_image_id(df)
    out["class_label"] = out["make"] + "_" + out["model"]
    num = out["listing_id"].str[2:].astype(int)
    split = np.where(num % 4 == 1, "val", np.where(num % 4 == 2, "test", "train"))
    out["split"] = np.where(out["status"] == "kept", split, None)
    return out


def _doc(df: pd.DataFrame) -> dict:
    return {"version": "v-test", "classes": sorted(df["class_label"].dropna().unique())}


def _dest(storage_uri: str, name: str) -> str:
    return f"{storage_uri.rstrip('/')}/{name}" if storage_uri.startswith("s3://") else f"{storage_uri}-{name}"


# ---------------------------------------------------------------------------------------
# which image a row trains on
# ---------------------------------------------------------------------------------------
def test_train_image_is_the_crop_and_uncropped_kept_rows_are_dropped(tmp_path):
    store = open_storage(str(tmp_path / "s"))
    df, _ = crop_manifest(store, n_listings=2, photos=1)
    out, dropped = with_train_image_id(df)
    assert dropped == 1
    has_crop = df["crop_id"].notna()
    assert (out.loc[has_crop, TRAIN_IMAGE] == df.loc[has_crop, "crop_id"]).all()
    assert out.loc[~has_crop, TRAIN_IMAGE].isna().all()
    assert out["reason"].tolist()[-2:] == [NOT_CROPPED, "no_vehicle"]
    assert (out["status"].iloc[-2:] == "dropped").all()
    # a clean manifest (no crop stage): the photo itself
    plain, dropped = with_train_image_id(df.drop(columns=["crop_id"]))
    assert dropped == 0 and (plain[TRAIN_IMAGE] == df["image_id"]).all()


def test_a_dataset_row_without_its_crop_is_an_error_not_the_photo(tmp_path):
    store = open_storage(str(tmp_path / "s"))
    df, _ = crop_manifest(store, n_listings=3, photos=1)
    df = df.assign(class_label="c", split="train")  # bypass the drop: every row in the dataset
    with pytest.raises(ExportError, match="no train_image_id"):
        export_rows(df)
    with pytest.raises(ExportError, match="crop_id"):
        export_folders(df, store, open_storage(str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------
# resize
# ---------------------------------------------------------------------------------------
def test_resize_never_upscales():
    assert target_size(640, 400, 224) == (224, 224)  # square: what training resizes to
    assert target_size(640, 150, 224) == (224, 150)  # never upscaled along either axis
    assert target_size(640, 400, 224, "shorter") == (358, 224)
    assert target_size(300, 900, 224, "shorter") == (224, 672)
    assert target_size(200, 100, 224, "shorter") == (200, 100)
    with pytest.raises(ValueError, match="fit"):
        target_size(1, 1, 1, "cover")
    rng = np.random.default_rng(1)
    big = _jpeg(_crop_image((90, 120, 30), 640, 400, rng))
    data, w, h = resize_jpeg(big, 224, fit="shorter")
    assert (w, h) == (358, 224) and Image.open(io.BytesIO(data)).size == (358, 224)
    data, w, h = resize_jpeg(big, 224)
    assert (w, h) == (224, 224) and Image.open(io.BytesIO(data)).size == (224, 224)
    small = _jpeg(_crop_image((90, 120, 30), 120, 90, rng))
    assert resize_jpeg(small, 224) == resize_jpeg(small, 224, fit="shorter") == (small, 120, 90)  # byte for byte
    grey = _jpeg(Image.new("L", (300, 200), 77))
    data, w, h = resize_jpeg(grey, 100, fit="shorter")
    im = Image.open(io.BytesIO(data))
    assert (w, h) == (150, 100) and im.mode == "RGB" and im.format == "JPEG"
    png = io.BytesIO()
    Image.new("RGBA", (50, 40), (1, 2, 3, 255)).save(png, "PNG")
    data, w, h = resize_jpeg(png.getvalue(), 100)
    assert (w, h) == (50, 40) and Image.open(io.BytesIO(data)).format == "JPEG"


# ---------------------------------------------------------------------------------------
# folders
# ---------------------------------------------------------------------------------------
def test_export_folders_writes_the_crop_bytes(storage, storage_uri):
    df, crops = crop_manifest(storage, n_listings=6, photos=2)
    ds = with_splits(df)
    dest = open_storage(_dest(storage_uri, "folders"))
    counts = export_folders(ds, storage, dest)
    rows = ds[ds["split"].notna()]
    assert counts["written"] == len(rows) == sum(counts["per_split"].values())
    assert counts["per_split"] == {s: int((rows["split"] == s).sum()) for s in SPLITS}
    keys = list(dest.list())
    assert len(keys) == len(rows)
    for r in rows.itertuples():
        key = f"{r.split}/{r.class_label}/{r.crop_id}.jpg"
        assert key in keys
        assert dest.get(key) == crops[r.crop_id] != storage.get_image(r.image_id)
    assert not any(r.image_id in k for r in rows.itertuples() for k in keys)
    again = export_folders(ds, storage, dest)
    assert again["skipped"] == len(rows) and again["written"] == 0


# ---------------------------------------------------------------------------------------
# TFRecord
# ---------------------------------------------------------------------------------------
def _records(files: list[str]) -> list[dict]:
    from carflow.frameworks import import_tensorflow

    tf = import_tensorflow()
    out = []
    for raw in tf.data.TFRecordDataset(files):
        ex = tf.train.Example.FromString(raw.numpy())
        f = ex.features.feature
        out.append({k: (f[k].bytes_list.value[0] if f[k].bytes_list.value else f[k].int64_list.value[0]) for k in f})
    return out


def test_tfrecord_round_trip(storage, storage_uri, tmp_path):
    df, crops = crop_manifest(storage, n_listings=12, photos=3)
    ds = with_splits(df)
    doc = _doc(ds)
    dest_uri = _dest(storage_uri, "tfrecord")
    meta = export_tfrecords(ds, storage, open_storage(dest_uri), doc, size=SIZE, shard_images=7)
    rows = ds[ds["split"].notna()]
    assert meta["skipped"] is False and meta["written"] == meta["count"] == len(rows)
    assert meta["classes"] == doc["classes"] and meta["image_size"] == SIZE
    stored = json.loads(open_storage(dest_uri).get("meta.json"))
    assert stored["content_key"] == meta["content_key"] and set(stored["features"]) >= {"image/encoded", "image/class/label"}
    for split in SPLITS:
        want = rows[rows["split"] == split]
        info = meta["splits"][split]
        n = -(-len(want) // 7)
        assert info["count"] == len(want) == sum(s["count"] for s in info["shards"])
        assert [s["file"] for s in info["shards"]] == [f"{split}/{split}-{i:05d}-of-{n:05d}.tfrecord" for i in range(n)]
        assert all(s["count"] <= 7 for s in info["shards"])

        files, _ = local_shards(dest_uri, split, cache_dir=tmp_path / "cache")
        if storage_uri.startswith("s3://"):
            assert all(str(tmp_path / "cache") in f for f in files)
        records = _records(files)
        assert sorted(r["image/id"].decode() for r in records) == sorted(want["crop_id"])
        by_crop = want.set_index("crop_id")
        for r in records:
            cid = r["image/id"].decode()
            assert r["image/class/label"] == doc["classes"].index(by_crop.at[cid, "class_label"])
            assert r["image/photo_id"].decode() == by_crop.at[cid, "image_id"]
            assert r["image/listing_id"].decode() == by_crop.at[cid, "listing_id"]
            im = Image.open(io.BytesIO(r["image/encoded"]))
            assert im.size == (SIZE, SIZE) == (r["image/width"], r["image/height"])  # crops > SIZE: square

        # the reader: every row once, labels in classes.json order, size×size uint8 crops
        seen = []
        for images, labels, ids in tfrecord_dataset(dest_uri, split, batch_size=5, with_ids=True, cache_dir=tmp_path / "cache"):
            assert images.dtype.name == "uint8" and tuple(images.shape[1:]) == (SIZE, SIZE, 3)
            for img, label, cid in zip(images.numpy(), labels.numpy(), ids.numpy(), strict=True):
                cls = by_crop.at[cid.decode(), "class_label"]
                assert doc["classes"][label] == cls
                assert np.abs(img.reshape(-1, 3).mean(0) - COLORS[cls]).max() < 12  # the crop, no grey frame
                seen.append(cid.decode())
        assert sorted(seen) == sorted(want["crop_id"])


def test_tfrecord_shorter_side_fit_keeps_the_aspect(tmp_path):
    store = open_storage(str(tmp_path / "s"))
    df, crops = crop_manifest(store, n_listings=4, photos=2)
    ds = with_splits(df)
    meta = export_tfrecords(ds, store, open_storage(str(tmp_path / "tfr")), _doc(ds), size=SIZE, fit="shorter")
    assert meta["fit"] == "shorter" and meta["count"] == 8
    records = _records(local_shards(str(tmp_path / "tfr"), "train")[0])
    assert records
    for r in records:
        im = Image.open(io.BytesIO(r["image/encoded"]))
        w0, h0 = Image.open(io.BytesIO(crops[r["image/id"].decode()])).size
        assert min(im.size) == SIZE and im.size == (r["image/width"], r["image/height"])
        assert abs(im.size[0] / im.size[1] - w0 / h0) < 0.05
    images, labels = next(iter(tfrecord_dataset(str(tmp_path / "tfr"), "train", batch_size=64)))
    assert tuple(images.shape) == (len(records), SIZE, SIZE, 3)


def test_tfrecord_export_is_cached_and_replaces_stale_shards(tmp_path):
    store = open_storage(str(tmp_path / "s"))
    df, _ = crop_manifest(store, n_listings=8, photos=2)
    ds = with_splits(df)
    doc = _doc(ds)
    dest = open_storage(str(tmp_path / "tfr"))
    first = export_tfrecords(ds, store, dest, doc, size=SIZE, shard_images=3)
    files = sorted(p for p in (tmp_path / "tfr").rglob("*.tfrecord"))
    mtimes = [p.stat().st_mtime_ns for p in files]
    again = export_tfrecords(ds, store, dest, doc, size=SIZE, shard_images=3)
    assert again["skipped"] is True and again["written"] == 0 and again["content_key"] == first["content_key"]
    assert [p.stat().st_mtime_ns for p in files] == mtimes
    # a deleted shard makes the export incomplete: redone
    files[0].unlink()
    redone = export_tfrecords(ds, store, dest, doc, size=SIZE, shard_images=3)
    assert redone["skipped"] is False and redone["content_key"] == first["content_key"] and files[0].exists()
    # another size or fit is other content
    assert export_tfrecords(ds, store, dest, doc, size=SIZE + 1, shard_images=3)["content_key"] != first["content_key"]
    assert export_tfrecords(ds, store, dest, doc, size=SIZE, shard_images=3, fit="shorter")["content_key"] != first["content_key"]
    # other content (fewer rows → fewer shards): new key, the old shards are gone
    fewer = ds[~ds["listing_id"].isin(["t:000", "t:004"])]
    third = export_tfrecords(fewer, store, dest, doc, size=SIZE, shard_images=3)
    assert third["content_key"] != first["content_key"]
    listed = {s["file"] for sp in third["splits"].values() for s in sp["shards"]}
    on_disk = {p.relative_to(tmp_path / "tfr").as_posix() for p in (tmp_path / "tfr").rglob("*.tfrecord")}
    assert on_disk == listed and len(listed) < len(files)
    assert all(re.fullmatch(r"(train|val|test)/\1-\d{5}-of-\d{5}\.tfrecord", f) for f in listed)


def test_tfrecord_missing_and_broken_images_are_counted_not_fatal(tmp_path):
    store = open_storage(str(tmp_path / "s"))
    df, _ = crop_manifest(store, n_listings=4, photos=2)
    ds = with_splits(df)
    train = ds[ds["split"] == "train"]
    gone, broken = train["crop_id"].iloc[0], train["crop_id"].iloc[1]
    (store.root / image_key(gone)).unlink()
    (store.root / image_key(broken)).write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    meta = export_tfrecords(ds, store, open_storage(str(tmp_path / "tfr")), _doc(ds), size=SIZE)
    assert meta["missing"] == 1 and meta["undecodable"] == 1
    assert meta["splits"]["train"]["count"] == len(train) - 2
    stored = json.loads((tmp_path / "tfr" / "meta.json").read_text())
    assert stored["missing_ids"] == [gone] and stored["undecodable_ids"] == [broken]


def test_tfrecord_refuses_a_class_missing_from_classes_json(tmp_path):
    store = open_storage(str(tmp_path / "s"))
    df, _ = crop_manifest(store, n_listings=3, photos=1)
    ds = with_splits(df)
    with pytest.raises(ExportError, match="ford_ranger"):
        export_tfrecords(ds, store, open_storage(str(tmp_path / "tfr")), {"version": "x", "classes": ["bmw_3-series", "volkswagen_golf"]}, SIZE)


# ---------------------------------------------------------------------------------------
# through the dataset flow (Prefect)
# ---------------------------------------------------------------------------------------
@pytest.mark.integration
def test_dataset_flow_exports_crops_as_tfrecord(tmp_path, prefect_server):
    from flows.dataset import dataset

    uri = str(tmp_path / "store")
    store = open_storage(uri)
    df, crops = crop_manifest(store, n_listings=12, photos=3)
    write_manifest(store, manifest_key("crop"), from_pandas(df))
    folders = tmp_path / "folders"
    summary = dataset(storage=uri, min_images=2, export_uri=str(folders), tfrecord=True, tfrecord_size=SIZE, run="r1")

    out = to_pandas(read_manifest(store, manifest_key("dataset"), INGEST_SCHEMA))
    assert summary["input"].endswith("manifests/crop/manifest.parquet") and summary["train_images"] == "crop_id"
    assert summary["not_cropped"] == 1 and summary["dropped_by_reason"][NOT_CROPPED] == 1
    rows = out[out["split"].notna()]
    assert (rows[TRAIN_IMAGE] == rows["crop_id"]).all() and len(rows) == 36
    per_split = {s: int((rows["split"] == s).sum()) for s in SPLITS}
    assert summary["per_split"] == per_split

    fold = summary["exports"]["folders"]
    assert fold["written"] == 36 and fold["per_split"] == per_split
    for r in rows.itertuples():
        assert (folders / r.split / r.class_label / f"{r.crop_id}.jpg").read_bytes() == crops[r.crop_id]

    tfr = summary["exports"]["tfrecord"]
    version = summary["version"]
    assert tfr["uri"] == store.uri(f"datasets/{version}/tfrecord")
    assert tfr["per_split"] == per_split and tfr["skipped"] is False and tfr["image_size"] == SIZE
    meta = json.loads(store.get(f"datasets/{version}/tfrecord/meta.json"))
    classes = json.loads(store.get(f"datasets/{version}/classes.json"))["classes"]
    assert meta["classes"] == classes and meta["classes_version"] == version
    for split in SPLITS:
        got = {}
        for _, labels, ids in tfrecord_dataset(tfr["uri"], split, batch_size=8, with_ids=True):
            got.update({i.decode(): int(lab) for i, lab in zip(ids.numpy(), labels.numpy(), strict=True)})
        want = rows[rows["split"] == split]
        assert got == {c: classes.index(k) for c, k in zip(want["crop_id"], want["class_label"], strict=True)}

    again = dataset(storage=uri, min_images=2, tfrecord=True, tfrecord_size=SIZE, run="r2")
    assert again["exports"]["tfrecord"]["skipped"] is True and "folders" not in again["exports"]
    assert again["exports"]["tfrecord"]["per_split"] == per_split
