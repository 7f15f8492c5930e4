"""The crop stage: exact box logic, the batched shard pass with a random-init YOLO, the
cached Prefect flow, and (slow) a fine-tuned detector scored against the demo site's
ground-truth car boxes."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# ultralytics reads its config dir at import: keep it out of ~/.config (and offline)
os.environ.setdefault("YOLO_CONFIG_DIR", tempfile.mkdtemp(prefix="carflow-yolo-cfg-"))
os.environ.setdefault("YOLO_OFFLINE", "1")

from carflow.settings import CropSettings  # noqa: E402
from carflow.storage import LocalStorage, open_storage  # noqa: E402
from tasks.crop import (  # noqa: E402
    crop_config,
    crop_decision,
    crop_images,
    crop_shard_to_storage,
    crop_spec,
    largest_box,
    pad_box,
)

ROOT = Path(__file__).resolve().parents[1]


# -- largest_box ------------------------------------------------------------------------
def test_largest_box_picks_the_largest_vehicle_and_merges_car_and_truck():
    boxes = [[0, 0, 100, 100],  # person (0): largest of all, ignored
             [10, 10, 40, 40],  # car: 900
             [50, 50, 90, 90],  # truck: 1600 → wins
             [0, 0, 20, 20]]    # car: 400
    det = largest_box(boxes, [0, 2, 7, 2], [0.9, 0.8, 0.5, 0.99])
    assert det == {"box": (50.0, 50.0, 90.0, 90.0), "det_class": "vehicle", "source_class": 7, "det_conf": 0.5}
    # car and truck come out as the same class
    assert largest_box([[0, 0, 10, 10]], [2], [0.9])["det_class"] == "vehicle"
    assert largest_box([[0, 0, 10, 10]], [7], [0.9])["det_class"] == "vehicle"


def test_largest_box_filters_classes_and_confidence():
    boxes = [[0, 0, 100, 100], [0, 0, 10, 10], [0, 0, 50, 50]]
    # the big car is below conf; the bus (5) is not a kept class
    assert largest_box(boxes, [2, 2, 5], [0.1, 0.3, 0.9], conf=0.25)["box"] == (0.0, 0.0, 10.0, 10.0)
    assert largest_box(boxes, [2, 2, 5], [0.1, 0.3, 0.9], conf=0.05)["box"] == (0.0, 0.0, 100.0, 100.0)
    # conf is inclusive
    assert largest_box([[0, 0, 5, 5]], [2], [0.25], conf=0.25) is not None
    # other keep_classes
    assert largest_box(boxes, [2, 2, 5], [0.1, 0.3, 0.9], keep_classes=(5,))["box"] == (0.0, 0.0, 50.0, 50.0)
    assert largest_box(boxes, [0, 1, 3], [0.9, 0.9, 0.9]) is None
    assert largest_box(np.zeros((0, 4)), np.zeros(0), np.zeros(0)) is None


def test_largest_box_tie_goes_to_higher_confidence():
    det = largest_box([[0, 0, 10, 10], [5, 5, 15, 15]], [2, 7], [0.4, 0.6])
    assert det["box"] == (5.0, 5.0, 15.0, 15.0) and det["det_conf"] == 0.6


def test_largest_box_rejects_mismatched_lengths():
    with pytest.raises(ValueError):
        largest_box([[0, 0, 1, 1]], [2, 2], [0.9])


# -- pad_box / crop_decision --------------------------------------------------------------
def test_pad_box_margin_is_a_fraction_of_the_box():
    # 40 x 20 box, 10 % → 4 px left/right, 2 px top/bottom
    assert pad_box((10, 20, 50, 40), 0.1, 100, 100) == (6, 18, 54, 42)
    assert pad_box((10, 20, 50, 40), 0.0, 100, 100) == (10, 20, 50, 40)


def test_pad_box_rounds_outwards_and_clips_to_the_image():
    assert pad_box((10.5, 10.2, 20.3, 30.9), 0.0, 100, 100) == (10, 10, 21, 31)
    assert pad_box((2, 3, 98, 78), 0.1, 100, 80) == (0, 0, 100, 80)
    assert pad_box((-5, -5, 120, 90), 0.0, 100, 80) == (0, 0, 100, 80)
    assert pad_box((90, 70, 100, 80), 0.5, 100, 80) == (85, 65, 100, 80)


def test_crop_decision_no_vehicle_too_small_and_kept():
    cfg = CropSettings(margin=0.1, min_side=30)
    assert crop_decision(None, 100, 100, cfg) == {
        "status": "dropped", "reason": "no_vehicle", "bbox": None, "det_class": None, "det_conf": None}
    small = {"box": (10, 10, 60, 35), "det_class": "vehicle", "source_class": 2, "det_conf": 0.9}
    # 50 x 25 → padded 60 x 30 (5 px, 2.5 px) → exactly min_side: kept
    row = crop_decision(small, 100, 100, cfg)
    assert row == {"status": "kept", "reason": None, "bbox": [5, 7, 65, 38], "det_class": "vehicle", "det_conf": 0.9}
    cfg2 = CropSettings(margin=0.0, min_side=30)
    row = crop_decision(small, 100, 100, cfg2)  # 50 x 25 < 30
    assert (row["status"], row["reason"], row["bbox"]) == ("dropped", "too_small", [10, 10, 60, 35])
    # clipping can make a crop too small
    edge = {"box": (95, 0, 140, 60), "det_class": "vehicle", "source_class": 7, "det_conf": 0.5}
    assert crop_decision(edge, 100, 100, cfg2)["reason"] == "too_small"


# -- the batched shard pass with a fake model (exact) ---------------------------------------
class FakeModel:
    """The :class:`models.detector.DetectorNet` interface; records each forward pass and
    'detects' a car where the image is red. Its letterbox is the identity, so a batch
    holds images of one size."""

    def __init__(self):
        self.calls: list[list[np.ndarray]] = []

    def letterbox(self, image, imgsz, rect=True):
        return image

    def detect(self, letterboxed, orig_shapes, conf, classes):
        assert len({a.shape for a in letterboxed}) == 1  # one forward pass = one shape
        self.calls.append(letterboxed)
        out = []
        for rgb, hw in zip(letterboxed, orig_shapes, strict=True):
            assert rgb.shape[:2] == hw
            red = (rgb[..., 0] > 200) & (rgb[..., 1] < 50)
            ys, xs = np.nonzero(red)
            if len(xs):
                out.append((np.array([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], np.float32),
                            np.array([2.0]), np.array([0.9])))
            else:
                out.append((np.zeros((0, 4), np.float32), np.zeros(0), np.zeros(0)))
        return out


def _jpeg(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")  # lossless: exact pixels for the fake model
    return buf.getvalue()


def _scene(w: int, h: int, box: tuple[int, int, int, int] | None) -> np.ndarray:
    arr = np.full((h, w, 3), 90, np.uint8)
    if box:
        x0, y0, x1, y1 = box
        arr[y0:y1, x0:x1] = (230, 10, 10)
    return arr


def test_shard_pass_batches_arrays_and_records_every_image(tmp_path):
    store = LocalStorage(tmp_path)
    cases = [(_scene(160, 120, (40, 30, 120, 90)), "kept"),
             (_scene(160, 120, None), "no_vehicle"),
             (_scene(160, 120, (5, 5, 20, 15)), "too_small"),
             (None, "decode_error"),
             (_scene(100, 80, (0, 0, 100, 80)), "kept")]
    ids = []
    for arr, _ in cases:
        ids.append(store.put_image(b"\xff\xd8\xff\xe0 not really a jpeg" if arr is None else _jpeg(arr)))
    ids.append("f" * 64)  # a lost original
    model = FakeModel()
    cfg = CropSettings(batch_size=2, margin=0.1, min_side=32, decode_workers=3)
    rows = crop_images(store, ids, model, cfg)
    assert [r["image_id"] for r in rows] == ids
    assert [r["reason"] or r["status"] for r in rows] == [c for _, c in cases] + ["missing"]
    # batches of up to batch_size same-shape arrays; undecodable/missing images never
    # reach the model: the three 160x120 scenes fill one batch of 2 (refilled past the bad
    # one) and a remainder of 1, the 100x80 scene is its own batch
    assert sorted([len(c), c[0].shape] for c in model.calls) == [[1, (80, 100, 3)], [1, (120, 160, 3)],
                                                                  [2, (120, 160, 3)]]
    kept = rows[0]
    assert kept["bbox"] == [32, 24, 128, 96] and kept["det_class"] == "vehicle"
    assert kept["det_conf"] == pytest.approx(0.9)
    crop_bytes = store.get_image(kept["crop_id"])
    assert hashlib.sha256(crop_bytes).hexdigest() == kept["crop_id"]
    with Image.open(io.BytesIO(crop_bytes)) as im:
        assert im.format == "JPEG" and im.size == (96, 72) == (kept["crop_width"], kept["crop_height"])
    assert rows[4]["bbox"] == [0, 0, 100, 80]
    assert rows[2]["bbox"] == [3, 4, 22, 16] and rows[2]["crop_id"] is None


def test_exif_rotated_photo_is_cropped_upright(tmp_path):
    store = LocalStorage(tmp_path)
    upright = _scene(120, 160, (20, 90, 100, 150))  # portrait, car low in the frame
    sideways = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)  # stored on its side
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° CW to display
    buf = io.BytesIO()
    sideways.save(buf, format="JPEG", quality=98, exif=exif)
    image_id = store.put_image(buf.getvalue())
    row = crop_images(store, [image_id], FakeModel(), CropSettings(margin=0.0, min_side=8))[0]
    x0, y0, x1, y1 = row["bbox"]
    assert abs(x0 - 20) <= 2 and abs(y0 - 90) <= 2 and abs(x1 - 100) <= 2 and abs(y1 - 150) <= 2


# -- detector loading --------------------------------------------------------------------
def test_import_loads_nothing():
    code = ("import sys, models.detector, tasks.crop, flows.crop; "
            "print(sorted(m for m in ('ultralytics', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_missing_weights_are_a_clear_error(tmp_path):
    from models.detector import DetectorWeightsError, load_detector

    with pytest.raises(DetectorWeightsError, match=r"crop\.weights.*CARFLOW_CROP__WEIGHTS") as exc:
        load_detector(str(tmp_path / "nope" / "best.pt"))
    assert "best.pt" in str(exc.value)
    with pytest.raises(DetectorWeightsError, match="CARFLOW_CROP__WEIGHTS"):
        load_detector("")


def test_hub_weights_without_network_are_a_clear_error(monkeypatch, tmp_path):
    """The real offline path: ultralytics really tries to download the hub weights and
    fails. The network is cut for this process through its proxy settings (a closed
    loopback port), so the test is offline on a machine with internet too."""
    from models.detector import DetectorWeightsError, load_detector

    for var in ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")  # discard port: nothing listens
    for var in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DetectorWeightsError, match=r"CARFLOW_CROP__WEIGHTS.*yolov5su\.pt.*needs the network"):
        load_detector("yolov5su.pt", cache=False)
    assert not list(tmp_path.rglob("*.pt"))  # nothing half-downloaded left behind


@pytest.mark.integration
def test_s3_weights_are_downloaded_through_storage(s3_uri):
    from models.detector import DetectorWeightsError, resolve_weights

    open_storage(s3_uri).put("models/det/best.pt", b"checkpoint bytes")
    local = resolve_weights(f"{s3_uri}/models/det/best.pt")
    assert Path(local).read_bytes() == b"checkpoint bytes" and local.endswith("best.pt")
    with pytest.raises(DetectorWeightsError, match=r"CARFLOW_CROP__WEIGHTS.*does not exist"):
        resolve_weights(f"{s3_uri}/models/det/missing.pt")


def test_ultralytics_does_not_patch_image_open_for_us():
    """ultralytics patches PIL.Image.open to pip-install pi-heif on unknown files; the
    detector loader undoes that so an undecodable photo is just a decode_error."""
    from PIL import Image

    from models.detector import import_ultralytics

    import_ultralytics()
    assert Image.open.__module__.startswith("PIL")


def test_weights_version_hashes_local_files(tmp_path):
    from models.detector import weights_version

    p = tmp_path / "w.pt"
    p.write_bytes(b"one")
    v1 = weights_version(str(p))
    p.write_bytes(b"two")
    assert v1 != weights_version(str(p)) and v1.startswith(str(p))
    assert weights_version("yolov5nu.yaml") == "yolov5nu.yaml"
    a = crop_config(CropSettings(weights=str(p)))
    b = crop_config(CropSettings(weights=str(p), decode_workers=9, gpu_limit="other"))
    assert a == b  # threads/limit do not change results: same cache key
    assert crop_spec(a).key(["b", "a"]) == crop_spec(a).key(["a", "b"])
    assert crop_spec(a).key(["a"]) != crop_spec(crop_config(CropSettings(weights=str(p), conf=0.5))).key(["a"])


# -- a random-init YOLO through the real shard pass ------------------------------------------
def _noise_jpeg(rng: np.random.Generator, w: int, h: int) -> bytes:
    small = rng.integers(0, 255, (h // 8, w // 8, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def random_yolo():
    from models.detector import load_detector

    return load_detector("yolov5nu.yaml")


def _random_init_cfg(**kw) -> CropSettings:
    # random weights score every class at ~2e-4 and never rank car/truck in their top 300:
    # count every class and conf 0 so that boxes (and crops) really come out
    base = {"weights": "yolov5nu.yaml", "batch_size": 3, "imgsz": 160, "conf": 0.0,
            "keep_classes": list(range(80)), "min_side": 4, "margin": 0.05, "device": "cpu"}
    return CropSettings(**{**base, **kw})


def _net(model, cfg):
    from models.detector import detector_net

    return detector_net(model, cfg.device, cfg.precision, cfg.torch_threads)


def test_a_batch_of_arrays_is_one_forward_pass(random_yolo):
    from tasks.crop import predict_batch

    cfg = _random_init_cfg()
    net = _net(random_yolo, cfg)
    mixed = [np.zeros((100 + 10 * i, 160, 3), np.uint8) for i in range(5)]
    same = [np.zeros((120, 160, 3), np.uint8) for _ in range(4)]
    before = len(net.calls)
    out = predict_batch(random_yolo, same, cfg)
    assert len(out) == 4 and net.calls[before:] == [(4, 3, 128, 160)]  # one size: rectangular, one pass
    # mixed sizes: one rectangular pass per letterbox shape (as the crop stage buckets
    # them), so each image's boxes equal its boxes alone, whatever it was batched with
    before = len(net.calls)
    out = predict_batch(random_yolo, mixed + mixed[:2], cfg)
    assert len(out) == 7 and sorted(c[0] for c in net.calls[before:]) == [2, 5]  # 128 and 160 px tall
    assert {c[2:] for c in net.calls[before:]} == {(128, 160), (160, 160)}
    for arr, got in zip(mixed, out, strict=False):
        alone = predict_batch(random_yolo, [arr], cfg)[0]
        for a, b in zip(got, alone, strict=True):  # boxes, classes, confidences
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-3)


def test_stream_batches_buckets_by_letterbox_shape_and_bounds_memory():
    from concurrent.futures import ThreadPoolExecutor

    from tasks.crop import stream_batches

    rng = np.random.default_rng(0)
    blobs = {}
    for i in range(20):  # two aspect ratios interleaved, one undecodable file
        w, h = (160, 120) if i % 2 else (120, 160)
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format="JPEG")
        blobs[f"id{i:02d}"] = buf.getvalue()
    blobs["id07"] = b"not an image"

    def shape_of(arr):  # a stand-in letterbox: the shape is the bucket key
        return arr[:8, :8] if arr.shape[0] < arr.shape[1] else arr[:8, :4]

    with ThreadPoolExecutor(4) as pool:
        out = list(stream_batches(list(blobs), blobs.__getitem__, 4, pool, shape_of))
    seen = [d.image_id for good, bad in out for d in good + bad]
    assert sorted(seen) == sorted(blobs)  # every image exactly once
    assert [d.image_id for _, bad in out for d in bad] == ["id07"]
    for good, _ in out:
        assert len({d.letterboxed.shape for d in good}) <= 1 and len(good) <= 4
    assert sum(len(g) == 4 for g, _ in out) >= 3  # full batches form despite the interleaving

    # many distinct shapes: partial buckets are flushed once more than max_buffered wait
    many = {f"m{i}": blobs[f"id{i:02d}"] for i in range(0, 20, 2)}
    with ThreadPoolExecutor(2) as pool:
        shapes = iter(range(1000))
        out = list(stream_batches(list(many), many.__getitem__, 4, pool,
                                  lambda a: np.zeros((next(shapes), 1), np.uint8), max_buffered=3))
    assert sorted(d.image_id for g, _ in out for d in g) == sorted(many)
    assert all(len(g) == 1 for g, _ in out if g)


def test_direct_forward_matches_ultralytics_predict(random_yolo):
    """Our letterbox + forward equal ultralytics' predict in fp32 (same tensor in, same
    predictions out); bf16 autocast moves the raw boxes by well under a pixel."""
    import torch

    from models.detector import DetectorNet

    rng = np.random.default_rng(3)
    arr = np.asarray(Image.open(io.BytesIO(_noise_jpeg(rng, 200, 150))).convert("RGB"))
    random_yolo.predict(np.ascontiguousarray(arr[..., ::-1]), imgsz=160, verbose=False)  # set up the predictor
    seen = {}
    hook = random_yolo.predictor.model.model.register_forward_hook(
        lambda _m, i, o: seen.update(x=i[0].clone(), y=(o[0] if isinstance(o, (tuple, list)) else o).clone()))
    try:
        random_yolo.predict(np.ascontiguousarray(arr[..., ::-1]), imgsz=160, verbose=False)
    finally:
        hook.remove()
    threads = torch.get_num_threads()
    fp32 = DetectorNet(random_yolo, "cpu", "fp32", threads=1)
    lb = fp32.letterbox(arr, 160)
    x = torch.from_numpy(lb[None]).permute(0, 3, 1, 2).float() / 255
    assert tuple(x.shape) == tuple(seen["x"].shape) and torch.equal(x, seen["x"])
    y = fp32.forward(lb[None])
    assert torch.get_num_threads() == threads  # restored after the pass
    assert torch.allclose(y, seen["y"], atol=1e-3, rtol=1e-4)
    bf16 = DetectorNet(random_yolo, "cpu", "bf16")
    yb = bf16.forward(lb[None])
    assert float((yb[:, :4] - seen["y"][:, :4]).abs().max()) < 1.0  # pixels in the 160 px input


def test_precision_resolution():
    from carflow.frameworks import cpu_has_fast_bf16
    from carflow.settings import SettingsError
    from models.detector import resolve_precision

    assert resolve_precision("auto", "cuda:0") == "fp16"
    assert resolve_precision("auto", "cpu") == ("bf16" if cpu_has_fast_bf16() else "fp32")
    assert resolve_precision("fp32", "cpu") == "fp32"
    with pytest.raises(SettingsError, match="crop.precision"):
        resolve_precision("fp16", "cpu")
    assert crop_config(CropSettings(weights="none", precision="fp32"))["precision"] == "fp32"
    # threads do not change results: not part of the cache key
    assert crop_config(CropSettings(weights="none", torch_threads=1)) == crop_config(CropSettings(weights="none"))


def test_random_init_yolo_shard_completes_caches_and_stores_crops(tmp_path, random_yolo, monkeypatch):
    store = LocalStorage(tmp_path)
    rng = np.random.default_rng(1)
    ids = [store.put_image(_noise_jpeg(rng, 160 + 16 * i, 120)) for i in range(6)]
    bad = store.put_image(b"\xff\xd8\xff\xe0" + b"\x00" * 500)  # JPEG magic, no image
    ids.insert(2, bad)
    cfg = _random_init_cfg()
    net = _net(random_yolo, cfg)
    monkeypatch.setattr(random_yolo, "predict", lambda *_a, **_k: pytest.fail("ultralytics' predictor used"))
    before = len(net.calls)
    out = crop_shard_to_storage(store, ids, cfg, model=random_yolo)
    # 6 good images, two letterbox shapes (3 each): two full batches; the bad image never
    # reaches the model
    assert out["reused"] is False and sorted(c[0] for c in net.calls[before:]) == [3, 3]
    import pyarrow.parquet as pq

    rows = pq.read_table(io.BytesIO(store.get(out["key"]))).to_pylist()
    by_id = {r["image_id"]: r for r in rows}
    assert len(rows) == 7 and by_id[bad]["reason"] == "decode_error" and by_id[bad]["status"] == "dropped"
    good = [by_id[i] for i in ids if i != bad]
    assert all(r["status"] == "kept" for r in good), [r["reason"] for r in good]
    for r in good:
        data = store.get_image(r["crop_id"])
        assert hashlib.sha256(data).hexdigest() == r["crop_id"]
        with Image.open(io.BytesIO(data)) as im:
            assert im.size == (r["crop_width"], r["crop_height"])
            x0, y0, x1, y1 = r["bbox"]
            assert im.size == (x1 - x0, y1 - y0)
    assert out["stats"]["dropped:decode_error"] == 1 and out["stats"]["inferred"] == 6

    # the vehicle filter as configured by default: a random model finds no car or truck
    default = crop_shard_to_storage(store, ids[:3], _random_init_cfg(conf=0.25, keep_classes=[2, 7]),
                                    model=random_yolo)
    rows = pq.read_table(io.BytesIO(store.get(default["key"]))).to_pylist()
    assert [r["reason"] for r in rows] == ["no_vehicle", "no_vehicle", "decode_error"]

    # a rerun is served from storage: no model is loaded and nothing is inferred
    import models.detector as detector

    monkeypatch.setattr(detector, "load_detector", lambda *_a, **_k: pytest.fail("model loaded on a rerun"))
    before = len(net.calls)
    again = crop_shard_to_storage(store, list(reversed(ids)), cfg)
    assert again["reused"] is True and again["key"] == out["key"] and len(net.calls) == before


# -- the flow ----------------------------------------------------------------------------------
def _clean_manifest(store, blobs: list[bytes]):
    from carflow.manifest import CLEAN_SCHEMA, from_records, manifest_key, write_manifest

    rows = []
    for i, data in enumerate(blobs):
        image_id = store.put_image(data)
        rows.append({"image_id": image_id, "listing_id": f"x:{i // 2}", "site": "x", "url": None,
                     "photo_index": i % 2, "make": None, "model": None, "year": None, "label": None,
                     "make_raw": None, "model_raw": None, "raw_key": f"raw/{image_id[:2]}/{image_id}",
                     "bytes": len(data), "content_type": None, "source": "folders", "crawl_id": None,
                     "first_seen": i, "status": "kept" if i else "dropped", "reason": None if i else "blurry",
                     "source_id": image_id, "width": None, "height": None, "fix_actions": [],
                     "quality_flags": [], "phash": None, "dhash": None, "pixel_hash": None,
                     "dup_cluster": image_id, "label_conflict": False})
    write_manifest(store, manifest_key("clean"), from_records(rows, CLEAN_SCHEMA), CLEAN_SCHEMA)
    return rows


@pytest.mark.integration
def test_crop_flow_writes_the_manifest_and_reruns_from_cache(tmp_path, prefect_server, monkeypatch):
    import pandas as pd

    from carflow.manifest import manifest_key, read_manifest, to_pandas
    from carflow.settings import reset_settings
    from flows.crop import crop

    for k, v in {"WEIGHTS": "yolov5nu.yaml", "BATCH_SIZE": "4", "IMGSZ": "160", "CONF": "0.0",
                 "KEEP_CLASSES": "[" + ",".join(map(str, range(80))) + "]", "MIN_SIDE": "4",
                 "DEVICE": "cpu"}.items():
        monkeypatch.setenv(f"CARFLOW_CROP__{k}", v)
    reset_settings()
    try:
        store = open_storage(str(tmp_path))
        rng = np.random.default_rng(2)
        blobs = [_noise_jpeg(rng, 160, 120) for _ in range(7)] + [b"\xff\xd8\xff\xe0" + b"\x01" * 300]
        rows = _clean_manifest(store, blobs)
        # the `gpu` global concurrency limit does not exist on the test server: not an error
        first = crop(storage=str(tmp_path), shard_size=3)
        assert first["shards"] == 3 and first["cached_shards"] == 0 and first["inferred_images"] == 7
        df = to_pandas(read_manifest(store, manifest_key("crop")))
        assert len(df) == len(rows)
        assert {"bbox", "det_class", "det_conf", "crop_id"} <= set(df.columns)
        assert df.loc[0, "reason"] == "blurry" and pd.isna(df.loc[0, "crop_id"])  # dropped earlier: untouched
        assert df.loc[7, "reason"] == "decode_error"
        kept = df[df["status"] == "kept"]
        assert len(kept) == 6 and kept["crop_id"].notna().all() and set(kept["det_class"]) == {"vehicle"}
        assert all(len(b) == 4 for b in kept["bbox"])
        for crop_id in kept["crop_id"]:
            assert store.has_image(crop_id)

        again = crop(storage=str(tmp_path), shard_size=3)
        assert again["cached_shards"] == again["shards"] == 3 and again["inferred_images"] == 0

        # a shard file lost from storage is recomputed, not served as a dangling cache hit
        lost = sorted(store.list("work/crop/"))[0]
        store.delete(lost)
        healed = crop(storage=str(tmp_path), shard_size=3)
        assert store.exists(lost) and healed["inferred_images"] <= 3
    finally:
        reset_settings()


def test_flow_prefers_the_car_filter_manifest(tmp_path):
    from carflow.manifest import InputError, input_key

    store = open_storage(str(tmp_path))
    with pytest.raises(InputError, match=r"clean/manifest.parquet does not exist: run `carflow clean` first"):
        input_key(store, "crop")
    store.put("manifests/clean/manifest.parquet", b"x")
    assert input_key(store, "crop") == "manifests/clean/manifest.parquet"
    store.put("manifests/car_filter/manifest.parquet", b"x")
    assert input_key(store, "crop") == "manifests/car_filter/manifest.parquet"
    assert input_key(store, "crop", "clean") == "manifests/clean/manifest.parquet"  # explicit: as asked
    with pytest.raises(InputError, match=r"crop/manifest.parquet does not exist: run `carflow crop` first"):
        input_key(store, "dataset", "crop")  # an explicit source never falls back


# -- slow: fine-tune on the demo marketplace, then crop ---------------------------------------
def _iou(a, b) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union else 0.0


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_finetuned_detector_crops_overlap_true_car_boxes(tmp_path):
    from demo.generate import generate_site
    from demo.yolo import write_yolo_dataset
    from models.detector import place_font

    epochs = int(os.environ.get("CROP_TEST_EPOCHS", "30"))
    n_listings = int(os.environ.get("CROP_TEST_LISTINGS", "60"))
    t_start = time.perf_counter()
    site = tmp_path / "site"
    generate_site(site, seed=3, n_listings=n_listings, n_classes=6)
    data_yaml, held_out = write_yolo_dataset(site, tmp_path / "yolo")
    place_font()  # the dataset check wants Arial.ttf: a local copy, never a download

    from ultralytics import YOLO

    model = YOLO("yolov5nu.yaml")
    t0 = time.perf_counter()
    model.train(data=str(data_yaml), epochs=epochs, imgsz=320, batch=16, device="cpu", workers=0,
                project=str(tmp_path / "runs"), name="ft", exist_ok=True, plots=False, val=False,
                mosaic=0.0, amp=False, seed=0, deterministic=False, verbose=False, patience=0,
                # optimizer=auto would pick AdamW at lr 0.002*5/(4+nc) = 1.2e-4 for nc=80: too slow from scratch
                optimizer="AdamW", lr0=0.003, warmup_epochs=1)
    t_train = time.perf_counter() - t0
    best = Path(model.trainer.last)
    assert best.is_file()

    store = LocalStorage(tmp_path / "store")
    ids = [store.put_image(p["data"]) for p in held_out]
    cfg = CropSettings(weights=str(best), imgsz=320, batch_size=8, margin=0.0, min_side=8, device="cpu")
    from models.detector import load_detector

    t0 = time.perf_counter()
    rows = crop_images(store, ids, load_detector(cfg.weights, cache=False), cfg)
    t_crop = time.perf_counter() - t0
    cars = [(p, r) for p, r in zip(held_out, rows, strict=True) if p["is_car"]]
    ious = [(_iou(r["bbox"], p["bbox"]) if r["bbox"] else 0.0) for p, r in cars]
    non_car_kept = sum(r["status"] == "kept" for p, r in zip(held_out, rows, strict=True) if not p["is_car"])
    hit = sum(i >= 0.5 for i in ious) / len(ious)
    report = (f"fine-tune {epochs} epochs on {sum(1 for _ in (tmp_path / 'yolo/images/train').iterdir())} photos: "
              f"train {t_train:.0f}s, crop {len(ids)} held-out photos {t_crop:.1f}s, total "
              f"{time.perf_counter() - t_start:.0f}s; held-out cars {len(ious)}: IoU>=0.5 {hit:.0%}, "
              f"mean {np.mean(ious):.3f}, median {np.median(ious):.3f}, no box "
              f"{sum(r['bbox'] is None for _, r in cars)}; non-car photos kept {non_car_kept}")
    # reduced precision (bf16 on an AMX CPU under crop.precision=auto) against fp32: the
    # same decisions, the same crops (a near-tie between two boxes may flip the largest)
    fp32 = crop_images(store, ids, load_detector(cfg.weights, cache=False),
                       cfg.model_copy(update={"precision": "fp32"}))
    same = sum(a["reason"] == b["reason"] for a, b in zip(rows, fp32, strict=True)) / len(rows)
    both = [_iou(a["bbox"], b["bbox"]) for a, b in zip(rows, fp32, strict=True) if a["bbox"] and b["bbox"]]
    agree = sum(i >= 0.9 for i in both) / max(1, len(both))
    report += f"; vs fp32: same decision {same:.0%}, crops with IoU>=0.9 {agree:.0%}"
    print(report)
    (Path(os.environ.get("CROP_TEST_REPORT_DIR", tmp_path)) / "finetune_report.txt").write_text(report + "\n")
    assert hit >= 0.6, report
    assert same >= 0.95 and agree >= 0.95, report
