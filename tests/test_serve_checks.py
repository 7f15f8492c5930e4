"""Serving and the pipeline give a photo the same treatment, end to end over real HTTP:

- the fixer: the API runs the clean stage's own ``carflow.fixer.fix_image``, so every file
  of a corpus of broken ones gets the same verdict from both (dropped with a reason ⇔
  a 4xx with that reason; fixed or kept ⇔ served, with the same fix actions);
- the car filter: the API's ``p_car`` equals the scoring stage's for the same upload
  (one decode + resize, ``CarFilterPredictor.preprocess`` / ``decode_resize``);
- the detector: the crop settings stored with the detector version (``meta.json`` →
  ``crop``) are used by both the crop stage and the API, and the served box equals the
  crop stage's box.
"""

from __future__ import annotations

import io

import httpx
import numpy as np
import pytest
from PIL import Image
from serve_helpers import bomb_png, jpeg, register_stand_ins, running, scene, stand_in_loaders

from carflow.fixer import REASONS
from carflow.registry import Registry
from carflow.settings import load_settings

pytestmark = pytest.mark.integration


def post(base: str, data: bytes):
    return httpx.post(f"{base}/predict", files={"file": ("upload", data, "application/octet-stream")}, timeout=60)


# -- a corpus of broken (and fixable) files ---------------------------------------------------
def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _cut_with_eoi(data: bytes, keep: float) -> bytes:
    """A JPEG cut to ``keep`` of its bytes and given an EOI (a broken uploader's file):
    it decodes without an error, the missing rows as libjpeg's grey fill."""
    return data[: int(len(data) * keep)] + b"\xff\xd9"


def corpus() -> dict[str, bytes]:
    car = Image.fromarray(scene("audi_a4", size=(320, 240)))
    base = jpeg(np.asarray(car), quality=92)
    progressive = _save(car, "JPEG", quality=92, progressive=True)
    exif = Image.Exif()
    exif[0x0112] = 6
    sideways = car.transpose(Image.Transpose.ROTATE_90)
    frames = [car, Image.fromarray(scene("bmw_3-series", size=(320, 240)))]
    grey16 = Image.fromarray(np.asarray(car.convert("L"), np.uint16) * 257)  # mode I;16
    rgba = car.convert("RGBA")
    rgba.putalpha(200)
    png = _save(car, "PNG")
    return {
        "clean JPEG": base,
        "0 bytes": b"",
        "text": b"hello, this is not a photo\n" * 20,
        "HTML error page": b"<!doctype html><html><body>404 not found</body></html>",
        "binary junk": np.random.default_rng(0).bytes(3000),
        "decompression bomb": bomb_png(),
        "tiny image": jpeg(scene("audi_a4", size=(48, 40), box=(5, 5, 40, 35))),
        "TIFF": _save(car, "TIFF"),
        "JPEG cut in half, grey fill + EOI": _cut_with_eoi(base, 0.5),
        "JPEG cut near its end, grey fill + EOI": _cut_with_eoi(base, 0.97),
        "JPEG cut in half, no EOI": base[: len(base) // 2],
        "JPEG missing its last bytes": base[:-40],
        "JPEG header only": base[:80],
        "progressive JPEG": progressive,
        "progressive JPEG cut short": progressive[: len(progressive) * 2 // 3],
        "MPO (phone JPEG + a second image)": _save(frames[0], "MPO", save_all=True, append_images=frames[1:]),
        "CMYK JPEG": _save(car.convert("CMYK"), "JPEG", quality=92),
        "EXIF-rotated JPEG": _save(sideways, "JPEG", quality=92, exif=exif),
        "16-bit grey PNG": _save(grey16, "PNG"),
        "RGBA PNG": _save(rgba, "PNG"),
        "PNG cut short": png[: len(png) // 2],
        "animated GIF": _save(frames[0], "GIF", save_all=True, append_images=frames[1:]),
    }


def test_the_api_and_the_clean_stage_give_each_file_the_same_verdict(tmp_path):
    from serve.app import create_app
    from serve.chain import MESSAGES, STATUS
    from tasks.fix import inspect_image

    files = corpus()
    stage = {name: inspect_image(data) for name, data in files.items()}  # the clean stage, default settings
    # the corpus has both verdicts, and the cases a weaker copy of the checks got wrong
    assert stage["JPEG cut in half, grey fill + EOI"]["reason"] == "truncated"
    assert stage["JPEG cut near its end, grey fill + EOI"]["fix_actions"] == ["reencode_truncated"]
    assert "mpo_to_jpeg" in stage["MPO (phone JPEG + a second image)"]["fix_actions"]
    assert {r["reason"] for r in stage.values()} >= set(REASONS) - {"missing", "decode_error"}
    assert sum(r["status"] == "kept" for r in stage.values()) >= 10
    # every reason the fixer gives an upload ("missing" is the clean shard's) has a 4xx and plain words
    assert all(400 <= STATUS[r] < 500 and r in MESSAGES for r in REASONS if r != "missing")

    registry = Registry(str(tmp_path / "store"))
    register_stand_ins(registry, "v1")
    settings = load_settings(storage={"root": str(tmp_path / "store")})
    app = create_app(settings, loaders=stand_in_loaders(), registry=registry)
    with running(app) as base:
        for name, data in files.items():
            r = post(base, data)
            body, row = r.json(), stage[name]
            if row["status"] == "dropped":
                assert row["reason"] in REASONS, (name, row["reason"])
                assert (r.status_code, body["reason"]) == (STATUS[row["reason"]], row["reason"]), (name, body)
                assert 400 <= r.status_code < 500 and body["status"] == "rejected"
            else:  # fixed or kept as is → served (the models may still say "no car")
                assert body.get("reason") not in REASONS, (name, body)
                assert body["fix_actions"] == row["fix_actions"], name
                assert r.status_code == 200 or body["reason"] in ("no_car", "no_vehicle", "crop_too_small"), (name, body)
                if name != "16-bit grey PNG":  # grey: no car for the stand-in filter
                    assert r.status_code == 200 and body["top"][0]["label"] == "audi_a4", (name, body)


# -- the car filter: one decode + resize --------------------------------------------------------
def test_served_p_car_equals_the_scoring_stage(tmp_path):
    """The same uploads through the clean stage → the scoring stage (stored bytes, tf.data)
    and through the API (the fixer's stored bytes, ``preprocess`` per request, batched):
    the same ``p_car`` within 1e-5, the fixed photos included."""
    import pyarrow.parquet as pq

    from carflow.settings import CarFilterSettings
    from carflow.storage import LocalStorage
    from models.car_filter import build_car_filter, spread_random_init
    from serve.app import create_app
    from tasks.car_filter import resolve_model, score_shard_to_storage, scoring_config
    from tasks.car_filter_train import save_model_version
    from tasks.fix import inspect_image

    store = LocalStorage(tmp_path / "store")
    # the CPU default runtime (OpenVINO fp32) on both sides. (Keras on the CPU is not batch
    # invariant at this level: the same input in another batch moved p_car by ~1e-4; the
    # inputs themselves are equal to the bit: tests/test_car_filter.py)
    cf = CarFilterSettings(weights="none", image_size=32, alpha=0.35)
    save_model_version(store, spread_random_init(build_car_filter("none", 32, 0.35)), "cf1", cf)
    registry = Registry(store)
    register_stand_ins(registry, "v1")  # a stand-in detector and classifier; the car filter below is real
    registry.promote("car_filter", "cf1")

    rng = np.random.default_rng(5)
    big = Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)).resize((800, 600))
    exif = Image.Exif()
    exif[0x0112] = 6
    uploads = {
        "clean JPEG": jpeg(scene("audi_a4")),
        "large JPEG (decoded at 1/8)": _save(big, "JPEG", quality=90),
        "non-car JPEG": jpeg(scene(None, seed=3)),
        "PNG (re-encoded)": _save(Image.fromarray(scene("fiat_500_2015", seed=1)), "PNG"),
        "EXIF-rotated (re-encoded)": _save(Image.fromarray(scene("bmw_3-series", seed=2)), "JPEG", exif=exif),
        "cut JPEG (re-encoded)": _cut_with_eoi(jpeg(scene("toyota_corolla", seed=4)), 0.97),
    }
    # the pipeline: the clean stage stores the fixer's bytes; the scoring stage scores those
    ids = {}
    for name, data in uploads.items():
        row = inspect_image(data)
        assert row["status"] == "kept", (name, row)
        ids[name] = store.put_image(row["out_bytes"] if row["out_bytes"] is not None else data)
    chosen = resolve_model(store, cf)
    out = score_shard_to_storage(store, list(ids.values()), chosen["model"], chosen["version"],
                                 scoring_config(cf, chosen))
    scores = dict(zip(*pq.read_table(io.BytesIO(store.get(out["key"]))).to_pydict().values(), strict=True))

    settings = load_settings(storage={"root": str(tmp_path / "store")}, car_filter=cf.model_dump(),
                             serve={"car_threshold": 0.0, "max_wait_ms": 50})
    loaders = stand_in_loaders()
    del loaders["car_filter"]  # the real loader: CarFilterPredictor from the registry
    app = create_app(settings, loaders=loaders, registry=registry)
    with running(app) as base:
        served = {name: post(base, data).json() for name, data in uploads.items()}
    for name, body in served.items():
        assert body["versions"]["car_filter"] == "cf1", body
        assert abs(body["p_car"] - scores[ids[name]]) < 1e-5, (name, body["p_car"], scores[ids[name]])
    assert len({round(s, 4) for s in scores.values()}) > 3  # the scores really differ per photo


# -- the detector: the crop settings stored with its version --------------------------------------
def test_detector_crop_settings_come_from_the_version(tmp_path):
    from carflow.settings import CropSettings
    from models.crop import CropPredictor, detector_settings, weights_meta
    from tasks.crop import crop_config
    from tasks.detector_train import crop_meta, detector_version

    meta = {"crop": {"imgsz": 256, "conf": 0.1, "keep_classes": [2]}}
    got = detector_settings(CropSettings(), meta)
    assert (got.imgsz, got.conf, got.keep_classes) == (256, 0.1, [2])
    explicit = detector_settings(CropSettings(conf=0.4), meta)  # an explicit setting wins
    assert (explicit.imgsz, explicit.conf) == (256, 0.4)
    assert detector_settings(CropSettings(), {}) == CropSettings()
    assert CropPredictor(object(), CropSettings(), meta=meta).cfg.imgsz == 256

    # what a fine-tune stores: the training size, crop.* defaults, overrides; part of the version
    assert crop_meta({"imgsz": 320}) == {"imgsz": 320, "conf": 0.25, "keep_classes": [2, 7]}
    assert crop_meta({"imgsz": 320}, {"conf": 0.1})["conf"] == 0.1
    assert detector_version("fp", {"imgsz": 320}) != detector_version("fp", {"imgsz": 320}, {"conf": 0.1})

    # the crop stage reads them next to a registered version's weights.pt (crop.weights=latest)
    registry = Registry(str(tmp_path / "store"))
    v = registry.put_version("detector", {"weights.pt": b"w"}, meta, version="d1")
    weights = str(v.local_path("weights.pt"))
    assert weights_meta(weights)["crop"] == meta["crop"] and weights_meta("yolov5nu.yaml") == {}
    config = crop_config(CropSettings(weights=weights))
    assert (config["imgsz"], config["conf"], config["keep_classes"]) == (256, 0.1, [2])
    assert crop_config(CropSettings(weights=weights, imgsz=320))["imgsz"] == 320


def test_served_box_equals_the_crop_stage_box(tmp_path):
    """A random-init YOLO registered with its crop settings in meta.json (160 px, conf 0,
    every class: boxes really come out); the crop stage (``crop.weights=latest``) and the
    API (default ``crop.*``: nothing set explicitly) both use them: the same box."""
    from ultralytics import YOLO

    from carflow.settings import CropSettings
    from carflow.storage import LocalStorage
    from models.detector import registered_weights
    from serve.app import create_app
    from tasks.crop import crop_config, crop_images

    weights = tmp_path / "weights.pt"
    YOLO("yolov5nu.yaml").save(str(weights))
    store = LocalStorage(tmp_path / "store")
    registry = Registry(store)
    register_stand_ins(registry, "v1")
    stored = {"imgsz": 160, "conf": 0.0, "keep_classes": list(range(80))}
    registry.promote("detector", registry.put_version("detector", {"weights.pt": weights}, {"crop": stored},
                                                      version="d2"))
    photos = [jpeg(scene("audi_a4", size=(320, 240))), jpeg(scene("bmw_3-series", size=(200, 260), box=(20, 30, 180, 200)))]

    # the crop stage, as flows/crop.py runs it with crop.weights=latest and nothing else set
    crop_cfg = CropSettings(weights="latest", device="cpu", min_side=4)
    crop_cfg = crop_cfg.model_copy(update={"weights": registered_weights(crop_cfg.weights, store)})
    config = crop_config(crop_cfg)
    assert (config["imgsz"], config["conf"]) == (160, 0.0)
    cfg = CropSettings(**{k: v for k, v in config.items() if k in CropSettings.model_fields})
    from models.detector import load_detector

    ids = [store.put_image(p) for p in photos]
    rows = crop_images(store, ids, load_detector(cfg.weights, cache=False), cfg)
    assert all(r["bbox"] for r in rows), rows

    settings = load_settings(storage={"root": str(tmp_path / "store")}, crop={"device": "cpu", "min_side": 4},
                             serve={"max_wait_ms": 50})
    loaders = stand_in_loaders()
    del loaders["detector"]  # the real loader: CropPredictor from the registry version
    app = create_app(settings, loaders=loaders, registry=registry)
    with running(app) as base:
        # sent together: one batch of two shapes, as the crop stage would never batch them
        import concurrent.futures as cf

        with cf.ThreadPoolExecutor(2) as pool:
            served = list(pool.map(lambda p: post(base, p).json(), photos))
    for row, body in zip(rows, served, strict=True):
        assert body["versions"]["detector"] == "d2"
        assert body["box"] == row["bbox"], (body, row)
