"""The car/no-car filter: labelling kit, training from scratch on the demo marketplace
(labels from its ground truth through the kit's CSV import), scoring against the ground
truth, content-keyed caching of scoring shards, and weight resolution errors."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from carflow.manifest import manifest_key, to_pandas
from carflow.settings import CarFilterSettings, reset_settings
from carflow.storage import open_storage
from models.car_filter import WeightsError, build_car_filter
from tasks.car_filter import apply_threshold
from tasks.car_filter_train import save_model_version, split_train_val
from tasks.evaluation import metrics_at, threshold_table
from tasks.labelling import import_labels, sample_for_labelling

ROOT = Path(__file__).resolve().parents[1]
NON_CAR = ("interior", "dashboard", "wheel", "text_banner")
#: small and quick on 2 CPU cores; MobileNetV2 from scratch (weights=none)
TRAIN_ENV = {
    "CARFLOW_CAR_FILTER__IMAGE_SIZE": "64",
    "CARFLOW_CAR_FILTER__ALPHA": "0.35",
    "CARFLOW_CAR_FILTER__BATCH_SIZE": "32",
    "CARFLOW_CAR_FILTER__PATIENCE": "5",
    "CARFLOW_CAR_FILTER__WEIGHTS": "none",
}
EPOCHS = 15


# ---------------------------------------------------------------- unit tests


def test_importing_loads_no_tensorflow():
    code = (
        "import sys, models.car_filter, tasks.car_filter, tasks.car_filter_train, tasks.labelling, tasks.evaluation, flows.car_filter\n"
        "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules, 'TF imported eagerly'\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)


def test_sample_is_stratified_by_site_and_label():
    rows = []
    for site, label, n in (("a", "x", 600), ("a", "y", 300), ("b", "x", 90), ("b", None, 10)):
        rows += [{"image_id": f"{site}{label}{i:04d}", "site": site, "label": label, "status": "kept",
                  "first_seen": i} for i in range(n)]
    rows += [{"image_id": "dropped", "site": "a", "label": "x", "status": "dropped", "first_seen": 0}]
    df = pd.DataFrame(rows)
    s = sample_for_labelling(df, 100, seed=3)
    assert len(s) == 100 and s["image_id"].is_unique and "dropped" not in set(s["image_id"])
    counts = s.groupby(["site", s["label"].fillna("-")]).size().to_dict()
    assert abs(counts[("a", "x")] - 60) <= 1 and abs(counts[("a", "y")] - 30) <= 1
    assert abs(counts[("b", "x")] - 9) <= 1 and counts[("b", "-")] >= 1
    assert s.equals(sample_for_labelling(df, 100, seed=3))  # seeded
    assert not s.equals(sample_for_labelling(df, 100, seed=4))


def test_import_labels_from_csv(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text("image_id,label,site\nA,car,x\nB,no_car,x\nC,,x\nD, No-Car ,x\n")
    df = import_labels(str(path))
    assert df.to_dict("records") == [
        {"image_id": "A", "label": "car"}, {"image_id": "B", "label": "no_car"},
        {"image_id": "D", "label": "no_car"},
    ]
    path.write_text("image_id,label\nA,truck\n")
    with pytest.raises(ValueError, match="truck"):
        import_labels(str(path))
    path.write_text("image_id,label\nA,car\nA,no_car\n")
    with pytest.raises(ValueError, match="both"):
        import_labels(str(path))


@pytest.mark.integration  # the s3 case talks to the moto server
def test_import_labels_from_folders(storage):
    for key in ("car/aaa.jpg", "car/bbb.jpeg", "no_car/ccc.jpg", "no_car/notes.txt", "other/ddd.jpg"):
        storage.put(key, b"x")
    df = import_labels(storage.uri())
    assert df.to_dict("records") == [
        {"image_id": "aaa", "label": "car"}, {"image_id": "bbb", "label": "car"},
        {"image_id": "ccc", "label": "no_car"},
    ]


@pytest.mark.integration
def test_missing_weight_file_names_the_setting(tmp_path, s3_uri):
    for spec in (str(tmp_path / "nope.keras"), f"{s3_uri}/weights/nope.weights.h5"):
        with pytest.raises(WeightsError) as err:
            build_car_filter(spec, 64)
        assert "car_filter.weights" in str(err.value)
        assert "CARFLOW_CAR_FILTER__WEIGHTS" in str(err.value)
    with pytest.raises(WeightsError, match="car_filter.weights"):
        build_car_filter("imagenet21k", 64)


@pytest.mark.integration
def test_weight_files_round_trip(tmp_path, s3_uri):
    model = build_car_filter("none", 32, alpha=0.35)
    assert model.output_shape == (None, 1)
    x = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    want = model.predict(x, verbose=0)
    assert ((want > 0) & (want < 1)).all()
    weights = tmp_path / "cf.weights.h5"
    model.save_weights(weights)
    np.testing.assert_allclose(build_car_filter(str(weights), 32, alpha=0.35).predict(x, verbose=0), want, rtol=1e-5)
    store = open_storage(s3_uri)
    model.save(tmp_path / "cf.keras")
    store.put("m/cf.keras", (tmp_path / "cf.keras").read_bytes())
    got = build_car_filter(store.uri("m/cf.keras"), 32).predict(x, verbose=0)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    with pytest.raises(WeightsError, match="image_size"):
        build_car_filter(store.uri("m/cf.keras"), 64)


def test_openvino_runtime_matches_keras(tmp_path):
    from carflow.frameworks import cpu_has_fast_bf16
    from carflow.storage import LocalStorage
    from models.car_filter import CarFilterPredictor, OpenVinoModel, spread_random_init
    from tasks.car_filter import predict_ids

    model = build_car_filter("none", 32, alpha=0.35)
    spread_random_init(model)
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 255, (12, 32, 32, 3)).astype("float32")
    want = model.predict(x, verbose=0)
    assert float(want.max() - want.min()) > 0.05  # outputs really differ per image
    fp32 = OpenVinoModel(model, "fp32")
    assert fp32.input_shape == (None, 32, 32, 3)
    np.testing.assert_allclose(fp32(x), want, atol=2e-3)  # logits have std ~1 here
    assert fp32(x[:1]).shape == (1, 1) and fp32(x[:0]).shape == (0, 1)
    if cpu_has_fast_bf16():  # opt-in bf16 runs; its drift is not bounded here (this head
        # amplifies tiny feature differences on purpose), see car_filter.precision
        got = OpenVinoModel(model, "bf16")(x)
        assert got.shape == (12, 1) and ((got >= 0) & (got <= 1)).all()

    # through the scoring input pipeline (storage → decode → batches), undecodable → NaN
    from PIL import Image

    store = LocalStorage(tmp_path)
    ids = []
    for _ in range(7):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(buf, format="JPEG")
        ids.append(store.put_image(buf.getvalue()))
    ids.insert(3, store.put_image(b"\xff\xd8\xff not a jpeg"))
    keras_p = predict_ids(CarFilterPredictor(model), store, ids, 4)
    ov_p = predict_ids(CarFilterPredictor(fp32, "openvino"), store, ids, 4)
    assert np.isnan(keras_p[3]) and np.isnan(ov_p[3])
    np.testing.assert_allclose(np.delete(ov_p, 3), np.delete(keras_p, 3), atol=2e-3)


def test_serving_and_scoring_share_one_decode_and_resize():
    """``CarFilterPredictor.preprocess`` (serving, per upload) is ``decode_resize``, the
    function ``predict_encoded`` (scoring) and training map over tf.data: the same input
    pixels, so the same ``p_car``, for JPEGs at every DCT scale and for other formats."""
    import tensorflow as tf
    from PIL import Image

    from models.car_filter import CarFilterPredictor, decode_resize, spread_random_init

    model = spread_random_init(build_car_filter("none", 32, alpha=0.35))
    predictor = CarFilterPredictor(model, batch_size=3)
    rng = np.random.default_rng(2)
    blobs = []
    for w, h, fmt in ((32, 32, "JPEG"), (80, 48, "JPEG"), (160, 120, "JPEG"), (640, 480, "JPEG"), (90, 70, "PNG")):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (h // 4, w // 4, 3), dtype=np.uint8)).resize((w, h)).save(buf, fmt)
        blobs.append(buf.getvalue())
    x = np.stack([predictor.preprocess(b) for b in blobs])
    assert x.shape == (5, 32, 32, 3) and x.dtype == np.float32
    ds = tf.data.Dataset.from_tensor_slices(tf.constant(blobs)).map(lambda b: decode_resize(b, 32))
    np.testing.assert_array_equal(x, np.stack([a.numpy() for a in ds]))  # the very same pixels
    np.testing.assert_allclose(predictor.predict_inputs(x), predictor.predict_encoded(blobs), atol=1e-6)
    assert predictor.preprocess(b"") is None and predictor.preprocess(b"\xff\xd8\xff not a jpeg") is None
    assert predictor.predict_inputs(np.zeros((0, 32, 32, 3), np.float32)).shape == (0,)


def test_runtime_resolution_and_cache_key():
    from models.car_filter import resolve_runtime
    from tasks.car_filter import score_spec, scoring_config

    assert resolve_runtime("auto", "auto") == ("openvino", "fp32")  # no GPU here
    assert resolve_runtime("auto", "bf16") == ("openvino", "bf16")
    assert resolve_runtime("keras", "auto") == ("keras", "fp32")
    with pytest.raises(WeightsError, match="car_filter.runtime"):
        resolve_runtime("onnx", "auto")
    with pytest.raises(WeightsError, match="car_filter.precision"):
        resolve_runtime("keras", "bf16")
    chosen = {"alpha": 0.35, "image_size": 64}
    auto = scoring_config(CarFilterSettings(), chosen)
    bf16 = scoring_config(CarFilterSettings(precision="bf16"), chosen)
    assert auto["runtime"] == "openvino" and auto["precision"] == "fp32" and bf16["precision"] == "bf16"
    # a different precision rescores; a different batch size does not
    assert score_spec("v1", auto).key(["a"]) == score_spec("v1", {**auto, "batch_size": 7}).key(["a"])
    assert score_spec("v1", auto).key(["a"]) != score_spec("v1", bf16).key(["a"])
    assert score_spec("v1", auto).key(["a"]) != score_spec("v2", auto).key(["a"])


def test_scoring_resolves_the_model_through_the_registry(tmp_path):
    """The scoring stage's model: ``latest`` (the pointer the training moved), a version id,
    a version folder or its model.keras; one meta.json, no other pointer shape."""
    from carflow.registry import RegistryError
    from carflow.storage import LocalStorage
    from tasks.car_filter import resolve_model

    store = LocalStorage(tmp_path)
    cfg = CarFilterSettings(weights="none", image_size=32, alpha=0.35)
    with pytest.raises(RegistryError, match=r"car_filter.model.*carflow car-filter train"):
        resolve_model(store, cfg)
    model = build_car_filter("none", 32, 0.35)
    v1 = save_model_version(store, model, "v1", cfg, metrics={"accuracy": 0.9, "thresholds": []})
    save_model_version(store, model, "v2", cfg, set_latest=False)
    latest = json.loads(store.get_text("models/car_filter/latest.json"))
    assert latest["version"] == "v1" and latest["meta"] == "models/car_filter/v1/meta.json"
    assert v1.meta["metrics"] == {"accuracy": 0.9} and v1.meta["image_size"] == 32
    folder = tmp_path / "models/car_filter/v2"
    for spec, version in ((None, "v1"), ("latest", "v1"), ("v2", "v2"), (str(folder), "v2"),
                          (str(folder / "model.keras"), "v2")):
        chosen = resolve_model(store, cfg, spec)
        assert chosen["version"] == version and chosen["image_size"] == 32 and chosen["alpha"] == 0.35
        assert chosen["model"].endswith(f"models/car_filter/{version}/model.keras")
    with pytest.raises(RegistryError, match="v3"):
        resolve_model(store, cfg, "v3")


def test_threshold_metrics_and_apply():
    y = np.array([1, 1, 1, 0, 0])
    p = np.array([0.9, 0.8, 0.4, 0.2, 0.75])
    at = metrics_at(y, p, 0.7)
    assert at["precision"] == pytest.approx(2 / 3) and at["recall"] == pytest.approx(2 / 3)
    assert at["no_car_recall"] == pytest.approx(0.5) and at["accuracy"] == pytest.approx(0.6)
    table = threshold_table(y, p)
    assert [r["threshold"] for r in table][:2] == [0.05, 0.1] and table[-1]["threshold"] == 0.95
    manifest = pa.table({"image_id": ["a", "b", "c", "d", "e"], "status": ["kept", "kept", "dropped", "kept", "kept"],
                         "reason": [None, None, "duplicate", None, None]})
    scores = pa.table({"image_id": ["a", "b", "c", "e"], "p_car": pa.array([0.9, 0.1, 0.1, None], pa.float32())})
    out = apply_threshold(manifest, scores, 0.7)
    assert out["status"].to_pylist() == ["kept", "dropped", "dropped", "dropped", "dropped"]
    assert out["reason"].to_pylist() == [None, "no_car", "duplicate", "not_scored", "not_scored"]
    assert out["p_car"].to_pylist()[:3] == pytest.approx([0.9, 0.1, 0.1])  # every row gets its score


@pytest.mark.integration
def test_a_new_threshold_rescores_nothing(tmp_path, prefect_server):
    """The threshold is applied after the shards (not part of their key): a new threshold
    reuses every stored score and still moves the drops. An untrained 32 px model is enough."""
    from PIL import Image

    from carflow.manifest import CLEAN_SCHEMA, from_records, write_manifest
    from flows.car_filter import score

    uri = str(tmp_path)
    store = open_storage(uri)
    rng = np.random.default_rng(0)
    blobs = []
    for _ in range(6):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
        blobs.append(buf.getvalue())
    blobs.append(b"\xff\xd8\xff\xe0" + b"\x01" * 300)  # stored, but does not decode
    rows = []
    for i, data in enumerate(blobs):
        image_id = store.put_image(data)
        rows.append({"image_id": image_id, "listing_id": f"x:{i}", "site": "x", "url": None, "photo_index": 0,
                     "make": None, "model": None, "year": None, "label": None, "make_raw": None,
                     "model_raw": None, "raw_key": f"raw/{image_id[:2]}/{image_id}", "bytes": len(data),
                     "content_type": None, "source": "folders", "crawl_id": None, "first_seen": i,
                     "status": "kept" if i else "dropped", "reason": None if i else "blurry",
                     "source_id": image_id, "width": None, "height": None, "fix_actions": [],
                     "quality_flags": [], "phash": None, "dhash": None, "pixel_hash": None,
                     "dup_cluster": image_id, "label_conflict": False})
    write_manifest(store, manifest_key("clean"), from_records(rows, CLEAN_SCHEMA), CLEAN_SCHEMA)
    cfg = CarFilterSettings(weights="none", image_size=32, alpha=0.35)
    version = save_model_version(store, build_car_filter("none", 32, 0.35), "untrained", cfg)

    lax = score(storage=uri, model=version.uri(), threshold=0.0, shard_size=3)
    strict = score(storage=uri, model=version.uri(), threshold=1.0, shard_size=3)
    assert lax["scored_images"] == 6 and lax["cached_shards"] == 0
    assert strict["scored_images"] == 0 and strict["cached_shards"] == strict["shards"] == lax["shards"]
    assert lax["dropped_by_reason"] == {"blurry": 1, "not_scored": 1}
    assert strict["dropped_by_reason"] == {"blurry": 1, "not_scored": 1, "no_car": 5}
    df = _read(store, manifest_key("car_filter"))
    # the kept, decodable photos have their score; the earlier drop was never planned
    assert df["p_car"].notna().tolist() == [False, True, True, True, True, True, False]


def test_split_is_stratified():
    labels = pd.DataFrame({"image_id": [f"i{i}" for i in range(100)], "label": ["car"] * 90 + ["no_car"] * 10})
    split = split_train_val(labels, 0.2, seed=0)
    assert (split[labels["label"] == "car"] == "val").sum() == 18
    assert (split[labels["label"] == "no_car"] == "val").sum() == 2


# ---------------------------------------------------------------- the demo marketplace


# Training MobileNetV2 from scratch (weights=none) on the demo's ~25 non-car photos takes
# 1-2 min and its accuracy varies run to run (0.93-0.98 seen), so the tests that need a
# trained model are in the slow tier (`make test-slow`), not CI's default run.
@pytest.fixture(scope="module")
def site_dir(tmp_path_factory) -> Path:
    """A bigger marketplace than the session's: 120 listings → 40 planted non-car photos."""
    from demo.generate import generate_site

    out = tmp_path_factory.mktemp("car-filter-site")
    generate_site(out, seed=1, n_listings=120)
    return out


@pytest.fixture(scope="module")
def cleaned(site_dir, prefect_server, tmp_path_factory, crawl_to_manifest) -> str:
    from demo.server import DemoSite
    from flows.clean import clean

    with DemoSite(site_dir) as site:
        uri = crawl_to_manifest(site.url, str(tmp_path_factory.mktemp("car-filter-store")))
    clean(storage=uri, shard_size=1000)
    return uri


def _read(store, key) -> pd.DataFrame:
    return to_pandas(pq.read_table(io.BytesIO(store.get(key))))


def _truth(site_dir: Path) -> dict[str, dict]:
    from demo.truth import load_ground_truth

    gt = load_ground_truth(site_dir)
    return {p["sha256"]: p for lst in gt["listings"] for p in lst["photos"] if p["sha256"]}


@pytest.fixture(scope="module")
def train_env():
    saved = {k: os.environ.get(k) for k in TRAIN_ENV}
    os.environ.update(TRAIN_ENV)
    reset_settings()
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    reset_settings()


@pytest.fixture(scope="module")
def labels_csv(cleaned, site_dir, tmp_path_factory) -> Path:
    """The labelling kit over every kept image, 'labelled' from the ground truth."""
    from tasks.labelling import write_labelling_kit

    store = open_storage(cleaned)
    df = _read(store, manifest_key("clean"))
    sample = sample_for_labelling(df, 100_000, seed=0)
    kit = write_labelling_kit(store, sample, "labelling/kit")
    assert kit["images"] == len(sample) == kit["thumbs"] and kit["contact_sheets"]
    assert store.exists(f"labelling/kit/thumbs/{sample['image_id'].iloc[0]}.jpg")
    truth = _truth(site_dir)
    source = dict(zip(df["image_id"], df["source_id"]))
    rows = list(csv.DictReader(io.StringIO(store.get_text("labelling/kit/labels.csv"))))
    assert rows and all(r["label"] == "" for r in rows)
    for r in rows:
        r["label"] = "car" if truth[source[r["image_id"]]]["is_car"] else "no_car"
    path = tmp_path_factory.mktemp("labels") / "labels.csv"
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


@pytest.fixture(scope="module")
def trained(cleaned, labels_csv, train_env) -> dict:
    from flows.car_filter import train

    return train(labels=str(labels_csv), storage=cleaned, epochs=EPOCHS)


@pytest.fixture(scope="module")
def scored(trained, cleaned) -> tuple[dict, pd.DataFrame]:
    from flows.car_filter import score

    summary = score(storage=cleaned, shard_size=250)
    return summary, _read(open_storage(cleaned), manifest_key("car_filter"))


@pytest.mark.integration
@pytest.mark.slow
def test_model_export_has_config_and_metrics(trained, cleaned):
    store = open_storage(cleaned)
    prefix = f"models/car_filter/{trained['version']}"
    for name in ("model.keras", "meta.json", "metrics.json", "split.csv"):
        assert store.exists(f"{prefix}/{name}"), name
    config = json.loads(store.get_text(f"{prefix}/meta.json"))
    assert config["settings"]["weights"] == "none" and config["image_size"] == 64
    assert config["class_balance"]["train"]["no_car"] > 0 and config["data_counts"]["val"] > 0
    assert "command" in config
    metrics = json.loads(store.get_text(f"{prefix}/metrics.json"))
    assert len(metrics["thresholds"]) == 19 and {"precision", "recall", "accuracy"} <= set(metrics)
    latest = json.loads(store.get_text("models/car_filter/latest.json"))
    assert latest["version"] == trained["version"]


@pytest.mark.integration
@pytest.mark.slow
def test_trained_filter_reaches_095_val_accuracy(trained, scored, cleaned, site_dir):
    """Validation accuracy against the ground truth, at the threshold, ≥ 0.95."""
    _, df = scored
    store = open_storage(cleaned)
    split = pd.read_csv(io.StringIO(store.get_text(f"models/car_filter/{trained['version']}/split.csv")))
    truth = _truth(site_dir)
    val_ids = set(split.loc[split["split"] == "val", "image_id"])
    rows = df[df["image_id"].isin(val_ids)].drop_duplicates("image_id")
    is_car = rows["source_id"].map(lambda s: truth[s]["is_car"]).to_numpy(bool)
    p = rows["p_car"].to_numpy(float)
    acc = float(((p >= 0.7) == is_car).mean())
    print(f"\nval: {len(rows)} images ({(~is_car).sum()} no_car), accuracy {acc:.3f} at 0.7; "
          f"train-time metrics {trained['metrics']}")
    assert len(rows) == trained["counts"]["val"]
    assert acc >= 0.95
    assert trained["metrics"]["accuracy"] >= 0.95


@pytest.mark.integration
@pytest.mark.slow
def test_scoring_drops_planted_non_car_photos(scored, site_dir):
    summary, df = scored
    truth = _truth(site_dir)
    kind = df["source_id"].map(lambda s: truth[s]["kind"])
    assert df.loc[df["status"] == "kept", "p_car"].notna().all()
    # rows the clean stage kept are exactly the rows this stage scored
    scored_rows = df[df["p_car"].notna()]
    planted = scored_rows[kind[scored_rows.index].isin(NON_CAR)]
    cars = scored_rows[kind[scored_rows.index] == "car"]
    recall = float((planted["reason"] == "no_car").mean())
    false_drop = float((cars["reason"] == "no_car").mean())
    by_kind = planted.assign(kind=kind).groupby("kind")["reason"].apply(lambda r: float((r == "no_car").mean()))
    print(f"\nall scored rows: non-car recall {recall:.3f} ({len(planted)} rows; {by_kind.to_dict()}), "
          f"car false drops {false_drop:.3f} ({len(cars)} rows); {summary}")
    assert len(planted) >= 30
    # from-scratch training on ~25 non-car images is noisy run to run (CPU thread order):
    # observed recall 0.84-1.0 and car false drops 0.4-4.7% over 4 runs
    assert recall >= 0.8
    assert false_drop <= 0.06
    assert summary["no_car"] == int((df["reason"] == "no_car").sum())


@pytest.mark.integration
@pytest.mark.slow
def test_rescoring_is_cached_until_the_model_changes(scored, cleaned, train_env):
    from flows.car_filter import score

    first, _ = scored
    assert first["shards"] >= 2 and first["scored_images"] > 0
    again = score(storage=cleaned, shard_size=250)
    assert again["cached_shards"] == again["shards"] == first["shards"]
    assert again["scored_images"] == 0
    store = open_storage(cleaned)
    # a cached shard whose file was deleted from storage is scored again (only that one)
    shard_files = [k for k in store.list("work/car_filter/") if k.endswith(".parquet")]
    assert len(shard_files) == first["shards"]
    store.delete(shard_files[0])
    healed = score(storage=cleaned, shard_size=250)
    assert healed["cached_shards"] == first["shards"] - 1 and 0 < healed["scored_images"] <= 250
    assert store.exists(shard_files[0])
    cfg = CarFilterSettings(weights="none", image_size=64, alpha=0.35)
    new_version = save_model_version(store, build_car_filter("none", 64, 0.35), "test-v2", cfg, set_latest=False)
    fresh = score(storage=cleaned, model=new_version.uri(), shard_size=250)
    assert fresh["model_version"] == "test-v2"
    assert fresh["cached_shards"] == 0 and fresh["scored_images"] == first["scored_images"]
