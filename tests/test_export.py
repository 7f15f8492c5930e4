"""Dataset exports (tasks/export.py, tasks/tfrecord.py): crops, not photos; folders;
the incremental, content-keyed TFRecord export (local and S3), its index and GC; the
TF-free codec against TensorFlow, byte for byte; and the dataset flow with the export on."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

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
from carflow.settings import ClassesSettings
from carflow.storage import LocalStorage, image_key, open_storage
from tasks.classes import assign_classes
from tasks.export import (
    NOT_CROPPED,
    TRAIN_IMAGE,
    ExportError,
    ExportNotFound,
    export_folders,
    export_rows,
    export_tfrecords,
    gc_export_shards,
    iter_examples,
    open_export,
    resize_jpeg,
    target_size,
    tfrecord_dataset,
    with_train_image_id,
)
from tasks.split import SPLITS
from tasks.tfrecord import (
    CorruptRecordError,
    decode_example,
    encode_example,
    read_records,
    write_records,
)

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
# the TF-free codec (tasks/tfrecord.py) against TensorFlow
# ---------------------------------------------------------------------------------------
def test_codec_reads_and_writes_what_tensorflow_does_byte_for_byte(tmp_path):
    from carflow.frameworks import import_tensorflow

    tf = import_tensorflow()
    ours = encode_example({"image/encoded": b"\xff\xd8jpeg\x00bytes", "image/class/text": "bmw_3-series_2012",
                           "image/width": 224, "image/attributes": ["dent", "rust"], "image/empty": [],
                           "score": [0.5, 1.25]})
    # TensorFlow parses our Example, and its deterministic serialization is our bytes
    ex = tf.train.Example.FromString(ours)
    f = ex.features.feature
    assert f["image/encoded"].bytes_list.value == [b"\xff\xd8jpeg\x00bytes"]
    assert f["image/width"].int64_list.value == [224] and list(f["score"].float_list.value) == [0.5, 1.25]
    assert f["image/attributes"].bytes_list.value == [b"dent", b"rust"] and f["image/empty"].HasField("bytes_list")
    assert ex.SerializeToString(deterministic=True) == ours
    # we parse TensorFlow's Example
    theirs = tf.train.Example(features=tf.train.Features(feature={
        "a": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"x", b"y"])),
        "b": tf.train.Feature(int64_list=tf.train.Int64List(value=[-3, 2**40])),
    })).SerializeToString()
    assert decode_example(theirs) == {"a": [b"x", b"y"], "b": [-3, 2**40]}
    # framing: the same records make the same file; each reads the other's
    records = [ours, theirs, b"", bytes(range(256)) * 300]
    write_records(tmp_path / "ours.tfrecord", records)
    with tf.io.TFRecordWriter(str(tmp_path / "tf.tfrecord")) as w:
        for r in records:
            w.write(r)
    assert (tmp_path / "ours.tfrecord").read_bytes() == (tmp_path / "tf.tfrecord").read_bytes()
    assert [r.numpy() for r in tf.data.TFRecordDataset(str(tmp_path / "ours.tfrecord"))] == records
    assert list(read_records(tmp_path / "tf.tfrecord")) == records


def test_a_corrupt_record_names_the_file_and_record(tmp_path):
    path = tmp_path / "x.tfrecord"
    write_records(path, [b"first", b"second record"])
    data = bytearray(path.read_bytes())
    data[-6] ^= 0xFF  # inside the second record's data
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptRecordError, match=r"x\.tfrecord: record 1: data checksum"):
        list(read_records(path))
    assert list(read_records(path, verify=False))[0] == b"first"
    path.write_bytes(bytes(data[:-3]))
    with pytest.raises(CorruptRecordError, match="record 1: file ends inside the record"):
        list(read_records(path, verify=False))


# ---------------------------------------------------------------------------------------
# TFRecord export
# ---------------------------------------------------------------------------------------
def _split_rule(listing_ids: pd.Series) -> np.ndarray:
    num = listing_ids.str[2:].astype(int)
    return np.where(num % 4 == 1, "val", np.where(num % 4 == 2, "test", "train"))


def classed(df: pd.DataFrame, merge_map: dict | None = None, **cfg) -> tuple[pd.DataFrame, dict]:
    """The dataset rows the flow would make (tasks.classes, a listing-level split) and classes.json."""
    from tasks.classes import classes_document

    settings = ClassesSettings(min_images=1, **cfg)
    out, _ = with_train_image_id(df)
    out, info = assign_classes(out, settings, merge_map=merge_map or {})
    ok = (out["status"] == "kept") & out["class_label"].notna()
    out["split"] = np.where(ok, _split_rule(out["listing_id"]), None)
    return out, classes_document(info, settings)


def _wanted(ds: pd.DataFrame, doc: dict, split: str) -> dict[str, int]:
    rows = ds[ds["split"] == split]
    return {c: doc["classes"].index(k) for c, k in zip(rows["crop_id"], rows["class_label"], strict=True)}


def _read(index, split: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for ex in index.examples(split):
        assert ex["image_id"] not in out  # every image once
        out[ex["image_id"]] = ex["label"]
    return out


def test_tfrecord_round_trip_local_and_s3(storage, storage_uri, tmp_path):
    df, crops = crop_manifest(storage, n_listings=12, photos=3)
    ds, doc = classed(df)
    meta = export_tfrecords(ds, storage, doc, size=SIZE, shard_images=7)
    rows = ds[ds["split"].notna()]
    assert meta["skipped"] is False and meta["encoded"] == meta["count"] == len(rows) == 36
    assert meta["index_uri"] == storage.uri(f"datasets/{doc['version']}/export.json")
    index = open_export(storage_uri, doc["version"], cache_dir=tmp_path / "cache")
    assert index.classes == doc["classes"] and index.size == SIZE and index.splits == list(SPLITS)
    assert index.task == "multiclass" and index.excluded == set()
    for split in SPLITS:
        want = rows[rows["split"] == split]
        files = index.files(split)
        assert index.count(split) == len(want) and len(files) == -(-len(want) // 7)
        assert all(Path(f).exists() for f in files)
        if storage_uri.startswith("s3://"):
            assert all(str(tmp_path / "cache") in f for f in files)
        by_crop = want.set_index("crop_id")
        seen = []
        for f in files:
            for ex in iter_examples(f):
                cid = ex["image_id"]
                seen.append(cid)
                assert ex["label_text"] == "_".join(by_crop.at[cid, c] for c in ("make", "model")) + "_2017"
                assert index.label_index(ex["label_text"]) == doc["classes"].index(by_crop.at[cid, "class_label"])
                assert ex["photo_id"] == by_crop.at[cid, "image_id"] and ex["listing_id"] == by_crop.at[cid, "listing_id"]
                assert ex["attributes"] == []
                im = Image.open(io.BytesIO(ex["image"]))
                assert im.size == (SIZE, SIZE) == (ex["width"], ex["height"])  # crops > SIZE: square
        assert sorted(seen) == sorted(want["crop_id"])

        # TensorFlow reads the same export: every row once, labels in classes.json order, the crops
        got = {}
        for images, labels, ids in tfrecord_dataset(index, split, batch_size=5, with_ids=True):
            assert images.dtype.name == "uint8" and tuple(images.shape[1:]) == (SIZE, SIZE, 3)
            for img, label, cid in zip(images.numpy(), labels.numpy(), ids.numpy(), strict=True):
                cls = doc["classes"][label]
                assert np.abs(img.reshape(-1, 3).mean(0) - COLORS[cls]).max() < 12  # the crop, no grey frame
                got[cid.decode()] = int(label)
        assert got == _wanted(ds, doc, split) == _read(index, split)


def test_reader_runs_without_tensorflow(tmp_path):
    store = open_storage(str(tmp_path / "s"))
    df, _ = crop_manifest(store, n_listings=4, photos=2)
    ds, doc = classed(df)
    export_tfrecords(ds, store, doc, size=SIZE, shard_images=3)
    code = (
        "import sys, json\n"
        "from tasks.export import open_export\n"
        f"index = open_export({str(tmp_path / 's')!r}, {doc['version']!r})\n"
        "got = {s: sorted((e['image_id'], e['label']) for e in index.examples(s)) for s in index.splits}\n"
        "print(json.dumps({'tf': 'tensorflow' in sys.modules, 'got': got}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1], timeout=120)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["tf"] is False
    for split in SPLITS:
        assert {i: lab for i, lab in result["got"][split]} == _wanted(ds, doc, split)


def test_incremental_export_encodes_only_new_images(tmp_path):
    store = open_storage(str(tmp_path / "s"))
    df, _ = crop_manifest(store, n_listings=40, photos=3)  # 20 train, 10 val, 10 test listings
    ds, doc = classed(df)
    first = export_tfrecords(ds, store, doc, size=SIZE, shard_images=10)
    assert first["encoded"] == 120 and first["shards_written"] == 12
    files = {p: p.stat().st_mtime_ns for p in (tmp_path / "s").rglob("*.tfrecord")}

    # ~10% new listings: only their images are encoded, into new shards; old shards untouched
    df2, _ = crop_manifest(store, n_listings=44, photos=3)
    ds2, doc2 = classed(df2)
    assert doc2["version"] == doc["version"]  # same classes: the nightly case
    second = export_tfrecords(ds2, store, doc2, size=SIZE, shard_images=10)
    assert second["encoded"] == 12 and second["shards_written"] == 3 and second["shards_reused"] == 12
    assert all(p.stat().st_mtime_ns == m for p, m in files.items())
    index = open_export(str(tmp_path / "s"), doc2["version"])
    for split in SPLITS:
        assert _read(index, split) == _wanted(ds2, doc2, split)

    # small tails: a new 3-image shard is written beside the 6-image train tail (≥ half of
    # 10 stays); the next export reopens every tail under half a shard in the splits it adds to
    df3, _ = crop_manifest(store, n_listings=45, photos=3)  # listing 44: train
    third = export_tfrecords(classed(df3)[0], store, doc2, size=SIZE, shard_images=10)
    assert third["encoded"] == 3 and len(third["splits"]["train"]["shards"]) == 8
    df4, _ = crop_manifest(store, n_listings=49, photos=3)  # 45 val, 46 test, 47 train, 48 train
    ds4, doc4 = classed(df4)
    fourth = export_tfrecords(ds4, store, doc4, size=SIZE, shard_images=10)
    assert fourth["encoded"] == (3 + 3) + (3 + 3) + (3 + 6)  # val, test: tail + new; train: 3-tail + 2 listings
    assert sorted(s["records"] for s in fourth["splits"]["train"]["shards"]) == [6] + [9] + [10] * 6
    index = open_export(str(tmp_path / "s"), doc4["version"])
    for split in SPLITS:
        assert _read(index, split) == _wanted(ds4, doc4, split)

    # nothing new: nothing encoded, the same index
    again = export_tfrecords(ds4, store, doc4, size=SIZE, shard_images=10)
    assert again["skipped"] is True and again["encoded"] == 0 and again["content_key"] == fourth["content_key"]
    # another size or fit is another family: all new shards
    other = export_tfrecords(ds4, store, doc4, size=SIZE + 8, shard_images=10)
    assert other["encoded"] == 147 and other["family"] != fourth["family"]


def test_class_merge_and_ignore_list_reencode_nothing(tmp_path):
    store = open_storage(str(tmp_path / "s"))
    df, _ = crop_manifest(store, n_listings=12, photos=3)
    ds, doc = classed(df)
    first = export_tfrecords(ds, store, doc, size=SIZE, shard_images=4)
    assert first["encoded"] == 36 and len(doc["classes"]) == 3
    v1 = open_export(str(tmp_path / "s"), doc["version"])

    # merge bmw into golf: a new dataset version, no image encoded, labels follow the merge
    merged, mdoc = classed(df, merge_map={"bmw_3-series": "volkswagen_golf"})
    assert mdoc["classes"] == ["ford_ranger", "volkswagen_golf"] and mdoc["version"] != doc["version"]
    second = export_tfrecords(merged, store, mdoc, size=SIZE, shard_images=4)
    assert second["encoded"] == 0 and second["shards_written"] == 0 and second["excluded"] == []
    v2 = open_export(str(tmp_path / "s"), mdoc["version"])
    assert v2.label_index("bmw_3-series_2017") == v2.label_index("volkswagen_golf_2017") == 1
    for split in SPLITS:
        assert _read(v2, split) == _wanted(merged, mdoc, split)
        assert _read(v1, split) == _wanted(ds, doc, split)  # the old version still reads as it was

    # ignore ford: nothing encoded; ford images excluded by the index, not trained on
    ignored, idoc = classed(df, merge_map={"bmw_3-series": "volkswagen_golf"}, ignore=["ford_*"])
    third = export_tfrecords(ignored, store, idoc, size=SIZE, shard_images=4)
    assert third["encoded"] == 0 and third["shards_written"] == 0
    ford = set(df.loc[df["make"] == "ford", "crop_id"].dropna())
    v3 = open_export(str(tmp_path / "s"), idoc["version"])
    assert v3.excluded == ford and len(ford) == 12 and v3.label_index("ford_ranger_2017") is None
    assert sum(v3.count(s) for s in SPLITS) == 24
    for split in SPLITS:
        assert _read(v3, split) == _wanted(ignored, idoc, split)
        got = {}
        for _, labels, ids in tfrecord_dataset(v3, split, batch_size=8, with_ids=True):
            got.update({i.decode(): int(lab) for i, lab in zip(ids.numpy(), labels.numpy(), strict=True)})
        assert got == _wanted(ignored, idoc, split)


def test_a_row_that_changes_split_ends_up_in_its_new_split_only(tmp_path):
    store = open_storage(str(tmp_path / "s"))
    df, _ = crop_manifest(store, n_listings=12, photos=3)
    ds, doc = classed(df)
    export_tfrecords(ds, store, doc, size=SIZE, shard_images=4)
    moved = ds.copy()
    moved.loc[moved["listing_id"] == "t:000", "split"] = "val"  # train → val
    out = export_tfrecords(moved, store, doc, size=SIZE, shard_images=4)
    index = open_export(str(tmp_path / "s"), doc["version"])
    for split in SPLITS:
        assert _read(index, split) == _wanted(moved, doc, split)
    assert index.excluded == set()
    assert 3 <= out["encoded"] < 36  # the moved rows and the rest of the shards they were in, not everything


class FailingStorage(LocalStorage):
    """A local storage whose image reads fail after ``budget`` of them (a crash mid-export)."""

    def __init__(self, root, budget: int):
        super().__init__(root)
        self.budget = budget

    def get_image(self, image_id: str) -> bytes:
        self.budget -= 1
        if self.budget < 0:
            raise RuntimeError("worker lost")
        return super().get_image(image_id)


def test_an_old_index_keeps_working_during_and_after_a_new_export(tmp_path):
    root = tmp_path / "s"
    store = open_storage(str(root))
    df, _ = crop_manifest(store, n_listings=12, photos=3)
    ds, doc = classed(df)
    export_tfrecords(ds, store, doc, size=SIZE, shard_images=4)
    old = open_export(str(root), doc["version"])
    before = {s: _read(old, s) for s in SPLITS}

    # the nightly: more listings, same dataset version; it dies after a few shards
    df2, _ = crop_manifest(store, n_listings=30, photos=3)
    ds2, doc2 = classed(df2)
    with pytest.raises(RuntimeError, match="worker lost"):
        export_tfrecords(ds2, FailingStorage(root, budget=30), doc2, size=SIZE, shard_images=4, max_workers=1,
                         dest=store)
    assert json.loads(store.get(f"datasets/{doc['version']}/export.json"))["content_key"] == old.doc["content_key"]
    assert {s: _read(open_export(str(root), doc["version"]), s) for s in SPLITS} == before
    # the rerun finishes, reusing the shards the dead run completed; the old reader still reads
    done = export_tfrecords(ds2, store, doc2, size=SIZE, shard_images=4)
    assert done["shards_reused"] > 9 and done["encoded"] < 54 - 24
    assert {s: _read(old, s) for s in SPLITS} == before  # the index it holds still points at existing shards
    new = open_export(str(root), doc2["version"])
    for split in SPLITS:
        assert _read(new, split) == _wanted(ds2, doc2, split)

    # GC: nothing referenced is deleted; with the old index gone, only its own shards go
    merged, mdoc = classed(df2, merge_map={"bmw_3-series": "volkswagen_golf"})
    export_tfrecords(merged, store, mdoc, size=SIZE, shard_images=4)
    n_files = len(list(root.rglob("*.tfrecord")))
    gc = gc_export_shards(store)
    assert gc["deleted"] and all(not k.endswith(".tfrecord") or k not in {
        s["file"] for sp in new.doc["splits"].values() for s in sp["shards"]} for k in gc["deleted"])
    assert len(list(root.rglob("*.tfrecord"))) == n_files - sum(k.endswith(".tfrecord") for k in gc["deleted"])
    for v, d, data in ((doc2["version"], doc2, ds2), (mdoc["version"], mdoc, merged)):
        index = open_export(str(root), v)
        for split in SPLITS:
            assert _read(index, split) == _wanted(data, d, split)
    assert gc_export_shards(store)["deleted"] == []


def test_open_export_names_the_command_when_there_is_none(tmp_path):
    with pytest.raises(ExportNotFound, match="carflow dataset --tfrecord"):
        open_export(str(tmp_path / "empty"))
    with pytest.raises(ExportNotFound, match=r"abc123 has no TFRecord export.*carflow dataset --tfrecord"):
        open_export(str(tmp_path / "empty"), "abc123")


def test_tfrecord_shorter_side_fit_keeps_the_aspect(tmp_path):
    store = open_storage(str(tmp_path / "s"))
    df, crops = crop_manifest(store, n_listings=4, photos=2)
    ds, doc = classed(df)
    meta = export_tfrecords(ds, store, doc, size=SIZE, fit="shorter")
    assert meta["fit"] == "shorter" and meta["count"] == 8 and meta["family"] == f"tfrecord-{SIZE}-shorter-q90"
    index = open_export(str(tmp_path / "s"), doc["version"])
    records = [ex for f in index.files("train") for ex in iter_examples(f)]
    assert records
    for r in records:
        im = Image.open(io.BytesIO(r["image"]))
        w0, h0 = Image.open(io.BytesIO(crops[r["image_id"]])).size
        assert min(im.size) == SIZE and im.size == (r["width"], r["height"])
        assert abs(im.size[0] / im.size[1] - w0 / h0) < 0.05
    images, labels = next(iter(tfrecord_dataset(index, "train", batch_size=64)))
    assert tuple(images.shape) == (len(records), SIZE, SIZE, 3)


def test_tfrecord_missing_and_broken_images_are_listed_not_fatal(tmp_path):
    store = open_storage(str(tmp_path / "s"))
    df, crops = crop_manifest(store, n_listings=4, photos=2)
    ds, doc = classed(df)
    train = ds[ds["split"] == "train"]
    gone, broken = train["crop_id"].iloc[0], train["crop_id"].iloc[1]
    (store.root / image_key(gone)).unlink()
    (store.root / image_key(broken)).write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    meta = export_tfrecords(ds, store, doc, size=SIZE, shard_images=3)
    assert meta["missing"] == 1 and meta["undecodable"] == 1
    assert meta["missing_ids"] == [gone] and meta["undecodable_ids"] == [broken]
    assert meta["splits"]["train"]["count"] == len(train) - 2
    # a rerun retries neither while nothing changed; the missing image is exported once it is there
    again = export_tfrecords(ds, store, doc, size=SIZE, shard_images=3)
    assert again["encoded"] == 0 and again["skipped"] is True
    store.put(image_key(gone), crops[gone])
    back = export_tfrecords(ds, store, doc, size=SIZE, shard_images=3)
    assert back["missing"] == 0 and back["undecodable_ids"] == [broken] and back["splits"]["train"]["count"] == len(train) - 1
    assert gone in _read(open_export(str(tmp_path / "s"), doc["version"]), "train")


def test_multilabel_attributes_become_targets(tmp_path):
    store = open_storage(str(tmp_path / "s"))
    df, _ = crop_manifest(store, n_listings=4, photos=2)
    tags = [["dent"], ["rust", "dent"], [], ["scratch"]]
    df["attributes"] = [tags[i % 4] for i in range(len(df))]
    ds, doc = classed(df)
    with pytest.raises(ExportError, match="attributes"):
        export_tfrecords(ds.drop(columns=["attributes"]), store, doc, size=SIZE, task="multilabel")
    meta = export_tfrecords(ds, store, doc, size=SIZE, task="multilabel")
    assert meta["label_names"] == ["dent", "rust", "scratch"]
    index = open_export(str(tmp_path / "s"), doc["version"])
    assert index.task == "multilabel" and index.label_names == ["dent", "rust", "scratch"]
    rows = ds[ds["split"] == "train"].set_index("crop_id")
    got = {ex["image_id"]: ex["label"].tolist() for ex in index.examples("train")}
    assert set(got) == set(rows.index)
    for cid, target in got.items():
        assert target == [float(n in rows.at[cid, "attributes"]) for n in index.label_names]
    for _, targets, ids in tfrecord_dataset(index, "train", batch_size=64, with_ids=True):
        assert {i.decode(): t.tolist() for i, t in zip(ids.numpy(), targets.numpy(), strict=True)} == got


def test_tfrecord_refuses_a_class_missing_from_classes_json(tmp_path):
    store = open_storage(str(tmp_path / "s"))
    df, _ = crop_manifest(store, n_listings=3, photos=1)
    ds = with_splits(df)
    with pytest.raises(ExportError, match="ford_ranger"):
        export_tfrecords(ds, store, {"version": "x", "classes": ["bmw_3-series", "volkswagen_golf"]}, SIZE)


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
    assert tfr["index"] == store.uri(f"datasets/{version}/export.json")
    assert tfr["per_split"] == per_split and tfr["skipped"] is False and tfr["image_size"] == SIZE
    assert tfr["encoded"] == 36
    classes = json.loads(store.get(f"datasets/{version}/classes.json"))["classes"]
    index = open_export(uri)  # latest
    assert index.classes == classes and index.version == version
    for split in SPLITS:
        want = rows[rows["split"] == split]
        assert _read(index, split) == {c: classes.index(k) for c, k in zip(want["crop_id"], want["class_label"], strict=True)}

    again = dataset(storage=uri, min_images=2, tfrecord=True, tfrecord_size=SIZE, run="r2")
    assert again["exports"]["tfrecord"]["skipped"] is True and "folders" not in again["exports"]
    assert again["exports"]["tfrecord"]["per_split"] == per_split and again["exports"]["tfrecord"]["encoded"] == 0


def test_decode_square_gives_pillows_pixels_with_opencv(monkeypatch):
    """The training reader's decode (``carflow.imageio.decode_square``) takes OpenCV's
    faster path for an image already at the size and gives exactly Pillow's pixels (RGB
    order, grey and alpha images, EXIF orientation ignored as Pillow's path ignores it);
    other sizes are resized by Pillow."""
    import carflow.imageio as imageio

    assert imageio.opencv() is not None  # a dependency: the fast path is what runs here
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:24, 0:24]

    def encoded(img: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
        buf = io.BytesIO()
        img.save(buf, fmt, **kw)
        return buf.getvalue()

    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° on display
    smooth = np.stack([xx * 10, yy * 10, (xx + yy) * 5], -1).astype(np.uint8)
    cases = {
        "noise": encoded(Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)), quality=90),
        "smooth": encoded(Image.fromarray(smooth), quality=75),
        "grey": encoded(Image.fromarray(smooth[..., 0]), quality=90),
        "rgba_png": encoded(Image.fromarray(rng.integers(0, 256, (24, 24, 4), dtype=np.uint8)), "PNG"),
        "exif_rotated": encoded(Image.fromarray(smooth), quality=90, exif=exif),
        "other_size": encoded(Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)), quality=90),
    }
    fast = {k: imageio.decode_square(v, 24) for k, v in cases.items()}
    monkeypatch.setattr(imageio, "_OPENCV", [None])  # Pillow only
    for name, data in cases.items():
        slow = imageio.decode_square(data, 24)
        assert fast[name].shape == slow.shape == (24, 24, 3) and fast[name].dtype == np.uint8, name
        assert np.array_equal(fast[name], slow), name
    assert np.abs(fast["smooth"].astype(int) - smooth).mean() < 3  # RGB, not BGR
