"""The crawl → ingest DAG through real Prefect flows: the same crawl into a local folder
and into S3 (moto server over HTTP) gives the same manifest, and it matches the ground
truth of the demo marketplace."""

from __future__ import annotations

import pytest

from carflow.manifest import INGEST_SCHEMA, read_manifest
from carflow.registry import Registry
from carflow.storage import open_storage
from demo.truth import compare, expected_ingest, load_ground_truth

pytestmark = pytest.mark.integration

#: columns that legitimately differ between two crawls of the same site
RUN_SPECIFIC = {"crawl_id", "first_seen"}


def _crawl_and_ingest(site, storage_uri: str) -> tuple[dict, list[dict]]:
    from flows.crawl import crawl
    from flows.ingest import ingest

    stats = crawl(site="demo", storage=storage_uri, base_url=site.url)
    assert stats["finish_reason"] == "finished"
    summary = ingest(storage=storage_uri, sites=["demo"])
    table = read_manifest(open_storage(storage_uri), "manifests/ingest/manifest.parquet", INGEST_SCHEMA)
    rows = [{k: v for k, v in r.items() if k not in RUN_SPECIFIC} for r in table.to_pylist()]
    return summary, sorted(rows, key=lambda r: (r["listing_id"], r["image_id"]))


def test_local_and_s3_give_the_same_manifest(demo_site, demo_site_dir, local_uri, s3_uri, prefect_server):
    expected = expected_ingest(load_ground_truth(demo_site_dir))
    local_summary, local_rows = _crawl_and_ingest(demo_site, local_uri)
    s3_summary, s3_rows = _crawl_and_ingest(demo_site, s3_uri)

    assert compare(expected, local_summary) == {}
    assert compare(expected, s3_summary) == {}
    assert local_rows == s3_rows
    assert {(r["listing_id"], r["image_id"]) for r in local_rows} == expected["pairs"]
    assert s3_summary["manifest"].startswith("s3://")
    # every manifest row points at stored bytes whose hash is its image_id
    s3 = open_storage(s3_uri)
    stored = set(s3.list("raw/"))
    assert {r["raw_key"] for r in s3_rows} == stored


# ---------------------------------------------------------------- nightly: the model stages


def _env(monkeypatch, **values) -> None:
    """Set ``CARFLOW_<SECTION>__<FIELD>`` variables (``car_filter__threshold="0"``)."""
    from carflow.settings import reset_settings

    for k, v in values.items():
        monkeypatch.setenv(f"CARFLOW_{k.upper()}", str(v))
    reset_settings()


@pytest.fixture
def settings_reset():
    from carflow.settings import reset_settings

    yield
    reset_settings()


#: a random-init detector finds nothing at the default conf/classes: count every class at
#: conf 0 so that boxes (and crops) come out; tiny inputs keep it quick
RANDOM_DETECTOR_ENV = {"crop__imgsz": 160, "crop__conf": 0.0, "crop__min_side": 4, "crop__batch_size": 8,
                       "crop__device": "cpu", "crop__keep_classes": "[" + ",".join(map(str, range(80))) + "]"}


#: loopback: no politeness delays (the crawl subprocess reads the same settings)
FAST_CRAWL_ENV = {"crawl__autothrottle": "false", "crawl__download_delay": "0"}


def _tiny_car_filter(store, site_dir) -> dict:
    """A real (tiny) training run: 1 epoch at 32 px on the site's photos, labelled from
    the ground truth; exported as the latest version in ``store``."""
    import pandas as pd

    from carflow.settings import CarFilterSettings
    from tasks.car_filter_train import train_car_filter

    gt = load_ground_truth(site_dir)
    photos = [p for lst in gt["listings"] for p in lst["photos"]
              if p["sha256"] and p["problem"] in (None, "interior", "dashboard", "wheel", "text_banner")]
    rows = {}
    for p in photos:
        rows[store.put_image((site_dir / p["url"].lstrip("/")).read_bytes())] = "car" if p["is_car"] else "no_car"
    labels = pd.DataFrame({"image_id": list(rows), "label": list(rows.values())})
    cfg = CarFilterSettings(weights="none", image_size=32, alpha=0.35, batch_size=16, epochs=1)
    return train_car_filter(store, labels, cfg, epochs=1)


def _random_detector_file(path) -> str:
    from models.detector import load_detector

    load_detector("yolov5nu.yaml", cache=False).save(str(path))
    return str(path)


def test_nightly_without_a_car_filter_model_fails_before_crawling(local_uri, prefect_server, settings_reset):
    from flows.pipeline import NightlyParams, nightly
    from tasks.stages import StageNotReady

    with pytest.raises(StageNotReady) as err:
        nightly(NightlyParams(sites=["demo"], storage=local_uri, base_urls={"demo": "http://127.0.0.1:9"}))
    msg = str(err.value)
    for needle in ("car_filter.model", "CARFLOW_CAR_FILTER__MODEL", "carflow car-filter kit",
                   "carflow car-filter train", "CARFLOW_CAR_FILTER__ENABLED=false"):
        assert needle in msg
    assert not list(open_storage(local_uri).list("listings/"))  # nothing was crawled


def test_nightly_with_missing_detector_weights_fails_before_crawling(local_uri, tmp_path, prefect_server,
                                                                     monkeypatch, settings_reset):
    from flows.pipeline import NightlyParams, nightly
    from tasks.stages import StageNotReady

    _env(monkeypatch, car_filter__enabled="false", crop__weights=str(tmp_path / "missing.pt"))
    with pytest.raises(StageNotReady, match=r"CARFLOW_CROP__WEIGHTS.*CARFLOW_CROP__ENABLED=false"):
        nightly(NightlyParams(sites=["demo"], storage=local_uri, base_urls={"demo": "http://127.0.0.1:9"}))
    assert not list(open_storage(local_uri).list("listings/"))


def test_nightly_chains_car_filter_crop_dataset(demo_site, demo_site_dir, tmp_path, prefect_server, monkeypatch,
                                                settings_reset):
    """crawl → ingest → clean → car filter (the latest trained model) → crop → dataset: the
    dataset is built from the crop manifest, every row in a split has its crop; then with
    a stage off, its manifest is a pass-through and nothing stale is read."""
    from carflow.manifest import manifest_key, to_pandas
    from flows.pipeline import NightlyParams, nightly
    from tasks.stages import passthrough_of

    uri = str(tmp_path / "store")
    store = open_storage(uri)
    model = _tiny_car_filter(store, demo_site_dir)
    weights = _random_detector_file(tmp_path / "random-yolo.pt")
    # threshold 0: a 1-epoch model keeps every photo, so the crop stage sees them all
    _env(monkeypatch, car_filter__threshold="0", crop__weights=weights, **RANDOM_DETECTOR_ENV, **FAST_CRAWL_ENV)

    params = NightlyParams(sites=["demo"], storage=uri, base_urls={"demo": demo_site.url}, min_images=5, train="off")
    out = nightly(params)

    read = lambda stage: to_pandas(read_manifest(store, manifest_key(stage)))  # noqa: E731
    clean, cf, crop, data = read("clean"), read("car_filter"), read("crop"), read("dataset")
    assert out["car_filter"]["enabled"] and out["car_filter"]["model_version"] == model["version"]
    assert out["car_filter"]["input"] == store.uri(manifest_key("clean"))
    assert cf.loc[clean["status"].eq("kept").to_numpy(), "p_car"].notna().all()
    assert out["crop"]["input"] == store.uri(manifest_key("car_filter"))
    assert out["crop"]["weights"] == weights and out["crop"]["crops"] > 0
    assert "p_car" in crop.columns  # the crop manifest carries the car filter's columns on
    assert out["dataset"]["input"] == store.uri(manifest_key("crop"))
    in_split = data[data["split"].notna()]
    assert len(in_split) > 0 and len(out["dataset"]["classes"]) >= 2
    assert in_split["crop_id"].notna().all()
    assert all(store.has_image(c) for c in in_split["crop_id"])
    assert set(in_split["crop_id"]).isdisjoint(set(clean["image_id"]))  # crops, not the photos
    assert passthrough_of(store, "car_filter") is None and passthrough_of(store, "crop") is None

    # the car filter off: its manifest is the clean one (no stale p_car), crop reads it
    _env(monkeypatch, car_filter__enabled="false")
    off = nightly(params)
    assert off["car_filter"]["enabled"] is False
    assert passthrough_of(store, "car_filter")["input"] == manifest_key("clean")
    cf = read("car_filter")
    assert "p_car" not in cf.columns and len(cf) == len(clean)
    assert off["crop"]["input"] == store.uri(manifest_key("car_filter")) and "p_car" not in read("crop").columns
    assert off["crop"]["cached_shards"] == off["crop"]["shards"]  # same images, same detector: no inference
    assert off["dataset"]["input"] == store.uri(manifest_key("crop"))

    # both off: the dataset comes from uncropped photos, never from the stale crop manifest
    _env(monkeypatch, crop__enabled="false")
    both = nightly(params)
    assert both["crop"]["enabled"] is False and passthrough_of(store, "crop")["input"] == manifest_key("car_filter")
    data = read("dataset")
    assert "crop_id" not in data.columns
    in_split = data[data["split"].notna()]
    assert len(in_split) > 0 and set(in_split["image_id"]) <= set(clean["image_id"])


# ---------------------------------------------------------------- nightly: unchanged and 10% more

#: a classifier recipe that trains in seconds (tests/test_train.py's FAST, 1 epoch at 32 px)
TINY_TRAIN_ENV = {"train__backbone": "mobilenetv2", "train__alpha": "0.35", "train__weights": "none",
                  "train__image_size": "32", "train__batch_size": "16", "train__epochs": "1",
                  "train__early_stopping": "0", "train__warmup_epochs": "0", "train__workers": "1",
                  "train__export": "none"}
#: shards of 40 images and export shards of 2 records: an old shard is never reopened (a
#: shard under half full is), so a new image goes only into a new shard
SMALL_SHARDS_ENV = {"ingest__shard_size": "40", "car_filter__shard_size": "40", "split__tfrecord_shard_images": "2"}
N_LISTINGS, NEW_LISTINGS = 20, 2  # 10% more listings on the third night


@pytest.fixture(scope="module")
def nights(tmp_path_factory, prefect_server):
    """In the default tier (issue 13's caching tests run in CI): about 2-3 minutes on 2 cores
    for all four tests that share it. Three nightly runs on one storage: the demo site (20 listings, 3 classes), the same
    site again, then the site with 10% more listings (same seed: the old photos keep
    their bytes and URLs). Model stages: a tiny car filter (threshold 0: keeps all), a
    random-init detector counting every class; training: 1 epoch at 32 px."""
    import socket

    from carflow.manifest import manifest_key, to_pandas
    from carflow.settings import reset_settings
    from demo.generate import generate_site
    from demo.server import DemoSite
    from flows.pipeline import NightlyParams, nightly

    tmp = tmp_path_factory.mktemp("nights")
    old, grown = tmp / "site", tmp / "site-more"
    generate_site(old, seed=0, n_listings=N_LISTINGS, n_classes=3)
    generate_site(grown, seed=0, n_listings=N_LISTINGS, n_classes=3, new_listings=NEW_LISTINGS)
    uri = str(tmp / "store")
    store = open_storage(uri)
    _tiny_car_filter(store, old)
    weights = _random_detector_file(tmp / "random-yolo.pt")
    env = {"car_filter__threshold": "0", "crop__weights": weights, **RANDOM_DETECTOR_ENV, **FAST_CRAWL_ENV,
           **TINY_TRAIN_ENV, **SMALL_SHARDS_ENV}
    mp = pytest.MonkeyPatch()
    _env(mp, **env)
    with socket.socket() as sock:  # one port for all three nights: the photo URLs stay the same
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    read = lambda stage: to_pandas(read_manifest(store, manifest_key(stage)))  # noqa: E731
    runs, manifests = [], []
    try:
        for site_dir in (old, old, grown):
            with DemoSite(site_dir, port=port) as site:
                runs.append(nightly(NightlyParams(storage=uri, base_urls={"demo": site.url}, min_images=2)))
            manifests.append({st: read(st) for st in ("ingest", "clean", "car_filter", "crop", "dataset")})
    finally:
        mp.undo()
        reset_settings()
    return {"runs": runs, "manifests": manifests, "store": store}


@pytest.mark.timeout(1200)
def test_nightly_trains_evaluates_and_promotes_a_new_dataset(nights):
    first = nights["runs"][0]
    train = first["train"]
    assert train["trained"] and train["dataset_version"] == first["dataset"]["version"]
    assert train["evaluation"]["top1"] is not None and train["evaluation"]["n_test"] > 0
    assert train["promotion"]["promoted"]  # the first classifier: no champion yet
    reg = Registry(nights["store"])
    assert reg.get("classifier", train["version"]).meta["dataset_version"] == first["dataset"]["version"]
    assert reg.get("classifier", train["version"]).exists(f"eval/{first['dataset']['version']}/report.md")
    # the third night's challenger moved latest only if it won
    grown = nights["runs"][2]["train"]
    expected = grown["version"] if grown["promotion"]["promoted"] else train["version"]
    assert reg.latest("classifier").version == expected
    assert reg.latest("dataset").version == nights["runs"][2]["dataset"]["version"]


@pytest.mark.timeout(1200)
def test_second_night_decodes_infers_and_trains_nothing(nights):
    first, again = nights["runs"][:2]
    assert again["dataset"]["version"] == first["dataset"]["version"]  # same data, same version
    assert again["clean"]["cached_shards"] == again["clean"]["shards"] > 0
    assert again["clean"]["inspected_images"] == 0  # nothing decoded
    assert again["car_filter"]["cached_shards"] == again["car_filter"]["shards"] > 0
    assert again["car_filter"]["scored_images"] == 0  # no car filter inference
    assert again["crop"]["cached_shards"] == again["crop"]["shards"] > 0
    assert again["crop"]["inferred_images"] == 0  # no detector inference
    tf = again["dataset"]["exports"]["tfrecord"]
    assert tf["encoded"] == 0 and tf["shards_written"] == 0 and tf["skipped"]
    assert again["train"]["trained"] is False and "unchanged" in again["train"]["reason"]
    assert again["train"]["version"] == first["train"]["version"]
    trained_on_first = [v for v in Registry(nights["store"]).versions("classifier")
                        if v.meta["dataset_version"] == first["dataset"]["version"]]
    assert len(trained_on_first) == 1


def _new_in_fresh_shards(stage_manifest, old_ids: set[str], shard_size: int) -> tuple[int, int, int]:
    """(shards, shards holding a new image, images in those shards) of the stage's plan."""
    from tasks.shards import plan_shards

    shards = plan_shards(stage_manifest, shard_size)
    fresh = [ids for ids in shards if set(ids) - old_ids]
    return len(shards), len(fresh), sum(len(ids) for ids in fresh)


@pytest.mark.timeout(1200)
def test_ten_percent_more_listings_run_only_the_new_shards(nights):
    """Only the shards holding a new image run (every other shard is reused), and the
    incremental export encodes exactly the new dataset images; the new dataset version
    trains a challenger."""
    first, grown = nights["runs"][0], nights["runs"][2]
    m_old, m_new = nights["manifests"][0], nights["manifests"][2]
    old_photos = set(m_old["ingest"]["image_id"])
    new_photos = set(m_new["ingest"]["image_id"]) - old_photos
    assert new_photos and grown["ingest"]["listings"] == first["ingest"]["listings"] + NEW_LISTINGS
    # each stage's shards are planned on its input's image ids (a fixed photo is a new id after clean)
    for stage, inp, done in (("clean", "ingest", "inspected_images"), ("car_filter", "clean", "scored_images"),
                             ("crop", "car_filter", "inferred_images")):
        shards, fresh, images = _new_in_fresh_shards(m_new[inp], set(m_old[inp]["image_id"]), 40)
        assert 0 < fresh < shards, stage
        assert grown[stage]["shards"] == shards and grown[stage]["cached_shards"] == shards - fresh, stage
        assert grown[stage][done] == images < len(set(m_new[inp]["image_id"])), stage

    # the export: only the new train images are encoded, every earlier shard is reused
    def rows(df):
        d = df[df["split"].notna()]
        return set(zip(d["split"], d["crop_id"], strict=True))

    new_rows = rows(m_new["dataset"]) - rows(m_old["dataset"])
    assert new_rows and rows(m_old["dataset"]) <= rows(m_new["dataset"])  # no old row moved
    tf_old, tf_new = first["dataset"]["exports"]["tfrecord"], grown["dataset"]["exports"]["tfrecord"]
    assert tf_new["encoded"] == len(new_rows)
    assert tf_new["shards_reused"] == sum(tf_old["shards"].values())
    assert grown["dataset"]["version"] != first["dataset"]["version"]
    assert grown["train"]["trained"] and grown["train"]["version"] != first["train"]["version"]
    assert grown["train"]["promotion"] is not None  # champion/challenger decided (either way)


@pytest.mark.timeout(1200)
def test_run_summary_funnel_matches_the_manifests(nights):
    import json
    from collections import Counter

    from carflow.manifest import DROPPED, KEPT

    store = nights["store"]
    for run, m in zip(nights["runs"], nights["manifests"], strict=True):
        doc = json.loads(store.get(f"runs/{run['run']}/summary.json"))
        stages = {s["stage"]: s for s in doc["stages"]}
        assert list(stages) == ["ingest", "clean", "car_filter", "crop", "dataset"]
        for name in ("ingest", "clean", "car_filter", "crop"):
            df = m[name]
            assert stages[name]["rows"] == len(df)
            assert stages[name]["images"] == df.loc[df["status"].eq(KEPT), "image_id"].nunique()
        data = m["dataset"]
        assert stages["dataset"]["images"] == data.loc[data["split"].notna(), "crop_id"].nunique()
        assert stages["dataset"]["images"] == sum(run["dataset"]["per_split"].values())
        # each stage's own drops add up to every drop in the last manifest
        total = sum(s["dropped"] for s in doc["stages"])
        last = m["dataset"]
        assert total == int(last["status"].eq(DROPPED).sum() + (last["status"].eq(KEPT) & last["split"].isna()).sum())
        reasons = lambda df: Counter(df.loc[df["status"].eq(DROPPED), "reason"])  # noqa: E731
        assert stages["crop"]["dropped_by_reason"] == dict(reasons(m["crop"]) - reasons(m["car_filter"]))
        md = store.get_text(f"runs/{run['run']}/summary.md")
        assert doc["funnel"] in md and doc["funnel"].startswith(f"ingest {stages['ingest']['images']}")
        assert "| crop |" in md
    first_md = store.get_text(f"runs/{nights['runs'][0]['run']}/summary.md")
    assert "evaluation report.md" in first_md and "test top-1" in first_md


# ---------------------------------------------------------------- the demo job


def _demo(tmp_path, **kw) -> dict:
    """The demo flow in ``tmp_path``; one loopback port per test, so a rerun sees the
    same photo URLs (as `make demo` does with its fixed port)."""
    import socket

    from flows.demo import demo

    port_file = tmp_path / "port"
    if not port_file.exists():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port_file.write_text(str(s.getsockname()[1]))
    args = {"workdir": str(tmp_path / "work"), "storage": str(tmp_path / "store"), "port": int(port_file.read_text())}
    return demo(**{**args, **kw})


def _dataset_from_crops(result: dict) -> None:
    """The demo's dataset was built from the crop manifest: every row in a split has a
    stored crop, and it is not the uncropped photo."""
    from carflow.manifest import manifest_key, to_pandas

    store = open_storage(result["storage"])
    assert result["dataset_input"] == store.uri(manifest_key("crop"))
    data = to_pandas(read_manifest(store, manifest_key("dataset")))
    in_split = data[data["split"].notna()]
    assert len(in_split) > 0 and in_split["crop_id"].notna().all()
    assert (in_split["crop_id"] != in_split["image_id"]).all()
    assert all(store.has_image(c) for c in in_split["crop_id"].unique())


def test_demo_bootstraps_tiny_models_and_reuses_them(tmp_path, prefect_server, monkeypatch, settings_reset):
    """The demo's bootstrap path end to end with tiny recipes (1 epoch each): kit →
    ground-truth labels → car filter → score; YOLO dataset → fine-tune → crop → dataset
    from crops → export → classifier → evaluation → promotion → the API answers a photo;
    a rerun trains nothing, infers nothing and encodes nothing, and still serves."""
    # a 1-epoch filter and detector are not accurate: keep every photo and every box
    _env(monkeypatch, car_filter__threshold="0", crop__min_side="4", crop__device="cpu", **FAST_CRAWL_ENV)
    tiny = {"listings": 24, "classes": 4, "min_images": 5,
            "car_filter_recipe": {"epochs": 1, "image_size": 32, "batch_size": 16, "patience": 1},
            "detector_recipe": {"epochs": 1, "imgsz": 64, "batch": 16, "crop_conf": 0.0},
            "train_recipe": {"epochs": 1, "image_size": 32, "workers": 1}}
    first = _demo(tmp_path, **tiny)
    assert first["matches_ground_truth"]
    cf, det = first["trained"]["car_filter"], first["trained"]["detector"]
    assert cf["cached"] is False and det["cached"] is False
    assert cf["labels"]["no_car"] > 0 and cf["labels"]["car"] > cf["labels"]["no_car"]
    assert det["held_out"]["cars"] > 0 and det["params"]["epochs"] == 1
    assert first["car_filter"]["enabled"] and first["car_filter"]["model_version"] == cf["version"]
    assert first["crop"]["weights"] == det["weights"] and first["crop"]["crops"] > 0
    assert first["crop"]["input"].endswith("manifests/car_filter/manifest.parquet")
    _dataset_from_crops(first)
    check = first["ground_truth_check"]
    assert check["car_filter"]["car_images"] > 0 and check["car_filter"]["non_car_images"] > 0
    assert check["crop"]["kept_cars"] > 0
    clf = first["train"]
    assert clf["trained"] and clf["dataset_version"] == first["dataset_version"]
    assert clf["evaluation"]["n_test"] > 0 and clf["promotion"]["promoted"]
    assert {"report.md", "metrics.json", "confusion.png"} <= set(clf["files"])
    assert first["export"]["encoded"] == sum(first["per_split"].values())
    served = first["served"]
    assert served["status"] == 200 and served["answer"]["status"] == "ok"
    assert len(served["answer"]["top"]) == min(5, len(first["classes"]))
    assert {t["label"] for t in served["answer"]["top"]} <= set(first["classes"])
    assert set(first["finders"]) == {"label_issues", "merge"}
    assert first["summary"]["funnel"].startswith("ingest ") and first["summary"]["uri"].endswith("summary.md")

    again = _demo(tmp_path, **tiny)
    assert again["trained"]["car_filter"]["cached"] and again["trained"]["car_filter"]["version"] == cf["version"]
    assert again["trained"]["detector"]["cached"] and again["trained"]["detector"]["version"] == det["version"]
    assert again["car_filter"]["cached_shards"] == again["car_filter"]["shards"]
    assert again["crop"]["cached_shards"] == again["crop"]["shards"]
    assert again["per_split"] == first["per_split"]
    assert again["dataset_version"] == first["dataset_version"]
    assert again["export"]["encoded"] == 0 and again["export"]["skipped"]
    assert again["train"]["trained"] is False and again["train"]["version"] == clf["version"]
    assert again["served"]["status"] == 200
    assert again["summary"]["funnel"] == first["summary"]["funnel"]
    _dataset_from_crops(again)


def test_demo_with_models_off_passes_through(tmp_path, prefect_server, settings_reset):
    from tasks.stages import passthrough_of

    result = _demo(tmp_path, listings=24, classes=4, min_images=5, models="off", train="off")
    assert result["matches_ground_truth"] and result["trained"] == {}
    assert result["train"]["trained"] is False and "skipped" in result["served"]
    assert result["car_filter"]["enabled"] is False and result["crop"]["enabled"] is False
    store = open_storage(result["storage"])
    assert passthrough_of(store, "crop")["input"] == "manifests/car_filter/manifest.parquet"
    assert sum(result["per_split"].values()) > 0 and len(result["classes"]) >= 2


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_full_bootstrapped_demo_builds_the_dataset_from_crops(tmp_path, prefect_server, settings_reset):
    """`make demo` as shipped (60 listings, the bootstrap recipes), then a rerun: the car
    filter drops the planted non-car photos, the crops overlap the true car boxes, the
    dataset is built from crops, and the rerun trains nothing."""
    import time

    t0 = time.monotonic()
    first = _demo(tmp_path)
    t_first = time.monotonic() - t0
    t0 = time.monotonic()
    again = _demo(tmp_path)
    t_again = time.monotonic() - t0
    cf, crop = first["ground_truth_check"]["car_filter"], first["ground_truth_check"]["crop"]
    print(f"\nfirst run {t_first:.0f}s {first['seconds']}, rerun {t_again:.0f}s {again['seconds']}\n"
          f"car filter {first['trained']['car_filter'].get('metrics')} vs ground truth {cf}\n"
          f"detector held-out {first['trained']['detector']['held_out']}; crop vs ground truth {crop}\n"
          f"stages: car filter {first['car_filter']}, crop {first['crop']}\n"
          f"dataset {first['classes']} {first['per_split']} {first['dataset_dropped_by_reason']}")
    assert first["matches_ground_truth"]
    _dataset_from_crops(first)
    assert len(first["classes"]) >= 4
    # from-scratch training on 19 non-car photos is noisy (TF on a CPU is not
    # deterministic): 14-18 of 19 non-car and 1-22 of 264 cars dropped were seen
    assert cf["non_car_dropped"] >= 0.6 * cf["non_car_images"]
    assert cf["car_dropped"] <= 0.12 * cf["car_images"]
    assert first["trained"]["detector"]["held_out"]["iou50_rate"] >= 0.8
    assert crop["iou50_rate"] >= 0.9
    # the detector finds (nearly) every car; small ones are dropped as too_small, correctly
    cars = crop["by_kind"]["car"]
    assert cars.get("no_vehicle", 0) <= 0.05 * sum(cars.values()) and cars["kept"] > 0
    assert again["trained"]["car_filter"]["cached"] and again["trained"]["detector"]["cached"]
    assert again["crop"]["cached_shards"] == again["crop"]["shards"]
    # the classifier: trained once, better than chance, served; the rerun trains nothing
    ev = first["train"]["evaluation"]
    print(f"classifier {first['train']['version']}: {ev}; finders {first['finders']}; "
          f"served {first['served']['answer'].get('top')}")
    assert first["train"]["trained"] and ev["top1"] >= 2 / len(first["classes"])
    assert first["served"]["status"] == 200 and first["served"]["answer"]["status"] == "ok"
    assert again["train"]["trained"] is False and again["export"]["encoded"] == 0
    assert again["served"]["status"] == 200
    assert t_again < t_first / 2
    _dataset_from_crops(again)
