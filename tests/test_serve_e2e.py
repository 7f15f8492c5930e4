"""The prediction API end to end, with models made by the pipeline's own code.

On a small demo marketplace (10 classes, so a top-5 can miss), the quickest honest
pipeline: the site's photos go into a storage; the car filter is trained by
``tasks/car_filter_train`` (``weights=none``) from ground-truth car/no-car labels and
scores the photos through the scoring stage's shard function; the detector is
``yolov5nu.yaml`` fine-tuned from random init by ``tasks/detector_train`` on the site's
photos and true boxes (the demo's bootstrap, at 128 px), and the crop stage's
``crop_images`` crops the kept photos; the crops are split by listing, exported
(``tasks.export``) and registered as a dataset version (``tasks.classes.write_classes``);
``tasks/train`` trains a MobileNetV2 α 0.35 classifier from scratch at 64 px;
``tasks/evaluate`` evaluates it on the test split (storing the temperature) and promotes it.

Then the real app (the default loaders: ``CarFilterPredictor``, ``CropPredictor``,
``ClassifierPredictor`` resolved from the registry) runs under uvicorn on a loopback port,
and every test-split photo (the site's original bytes) is POSTed to ``/predict``,
8 at a time (so requests share batches). About 3 minutes on 2 shared cores: slow tier.
"""

from __future__ import annotations

import io
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
from serve_helpers import running

pytestmark = [pytest.mark.integration, pytest.mark.slow]

N_LISTINGS, N_CLASSES, PHOTO_SIZE = 80, 10, (128, 96)
SIZE = 64  # the classifier's input and the export's image size
#: the car filter: MobileNetV2 α 0.35 from scratch at 64 px (the demo's bootstrap recipe, smaller)
CAR_FILTER = {"weights": "none", "image_size": SIZE, "alpha": 0.35, "batch_size": 32, "epochs": 8,
              "patience": 20}
#: the detector: flows/demo.py's bootstrap recipe at the photos' own size (128 px): about
#: 35 s on 2 cores, ~98% of held-out cars boxed at IoU >= 0.5
DETECTOR = {"model": "yolov5nu.yaml", "epochs": 8, "imgsz": 128, "batch": 8, "warmup_epochs": 0, "lr0": 0.002,
            "device": "cpu"}
#: the crop settings, the same for the crop stage and for serving (``settings.crop``): the
#: defaults (conf 0.25, car + truck, 5% margin) at the detector's size; the cars are small
CROP = {"weights": "latest", "imgsz": 128, "min_side": 16, "device": "cpu"}
#: the classifier: tests/test_train.py's fast recipe at 64 px, 20 epochs (10 gave a test
#: top-1 of 0.39-0.47 and a model so fragile that the API and the evaluation disagreed on
#: 38% of top-1s; 20 epochs: 0.79 and 18%)
TRAIN = {"backbone": "mobilenetv2", "alpha": 0.35, "weights": "none", "image_size": SIZE, "batch_size": 16,
         "learning_rate": 3e-3, "warmup_epochs": 0.5, "early_stopping": 0, "label_smoothing": 0.0,
         "rotation": 0.0, "zoom": 0.0, "translation": 0.0, "contrast": 0.0, "workers": 2, "epochs": 20}
DATASET_VERSION = "e2e-demo"


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """Site → storage → car filter (train, score) → detector (fine-tune) → crop →
    dataset export → train → evaluate → promote. Returns what the test compares."""
    import pyarrow.parquet as pq

    from carflow.registry import Registry
    from carflow.settings import load_settings
    from carflow.storage import open_storage
    from demo.generate import generate_site
    from demo.yolo import write_yolo_dataset
    from models.detector import load_detector, registered_weights
    from tasks.car_filter import resolve_model, score_shard_to_storage, scoring_config
    from tasks.car_filter_train import train_car_filter
    from tasks.classes import write_classes
    from tasks.crop import crop_images
    from tasks.detector_train import finetune_detector
    from tasks.evaluate import evaluate_version, promote_if_better
    from tasks.evaluation import box_hits
    from tasks.export import export_tfrecords
    from tasks.train import train_classifier

    seconds: dict[str, float] = {}
    clock = time.monotonic()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.monotonic()
        seconds[name] = round(now - clock, 1)
        clock = now

    root = tmp_path_factory.mktemp("serve-e2e")
    site = root / "site"
    gt = generate_site(site, seed=0, n_listings=N_LISTINGS, n_classes=N_CLASSES, image_size=PHOTO_SIZE,
                       label_problems=False)
    uri = str(root / "store")
    store = open_storage(uri)
    settings = load_settings(storage={"root": uri}, car_filter=CAR_FILTER, crop=CROP,
                             serve={"max_batch_size": 16, "max_wait_ms": 20})
    registry = Registry(store)

    # the photos the clean stage keeps as they are: clean car photos and the non-car kinds
    photos: dict[str, dict] = {}
    for i, lst in enumerate(gt["listings"]):
        for p in lst["photos"]:
            if p["sha256"] and p["problem"] in (None, "interior", "dashboard", "wheel", "text_banner"):
                data = (site / p["url"].lstrip("/")).read_bytes()
                image_id = store.put_image(data)
                photos.setdefault(image_id, {**p, "data": data, "listing": i, "listing_id": lst["listing_id"],
                                             "class_label": lst["class_key"]})
    ids = list(photos)
    lap("site")

    # car filter: train on ground-truth labels, then the scoring stage's shard pass
    labels = pd.DataFrame({"image_id": ids, "label": ["car" if photos[i]["is_car"] else "no_car" for i in ids]})
    trained_cf = train_car_filter(store, labels, settings.car_filter, command="tests/test_serve_e2e.py")
    chosen = resolve_model(store, settings.car_filter)
    shard = score_shard_to_storage(store, ids, chosen["model"], chosen["version"],
                                   scoring_config(settings.car_filter, chosen))
    scores = pq.read_table(io.BytesIO(store.get(shard["key"]))).to_pandas()
    p_car = dict(zip(scores["image_id"], scores["p_car"], strict=True))
    threshold = settings.car_filter.threshold
    kept = [i for i in ids if p_car[i] >= threshold]
    lap("car_filter")

    # detector: yolov5nu fine-tuned from random init on the site's photos and true boxes
    # (tasks.detector_train, registered and promoted), then the crop stage's pass
    data_yaml, held_out = write_yolo_dataset(site, root / "yolo", val_every=5)
    detector = finetune_detector(store, data_yaml, DETECTOR, command="tests/test_serve_e2e.py")
    hits = box_hits(held_out, detector["weights"], CROP["imgsz"], conf=settings.crop.conf, device="cpu")
    crop_cfg = settings.crop.model_copy(update={"weights": registered_weights("latest", store)})
    rows = crop_images(store, kept, load_detector(crop_cfg.weights, cache=False), crop_cfg)
    crops = pd.DataFrame(rows)
    lap("crop")

    # dataset: the kept crops of labelled car photos, split by listing (3/5 train, 1/5 val, 1/5 test)
    crops["class_label"] = [photos[i]["class_label"] for i in crops["image_id"]]
    crops["listing_id"] = [photos[i]["listing_id"] for i in crops["image_id"]]
    crops["split"] = [("train", "train", "train", "val", "test")[photos[i]["listing"] % 5] for i in crops["image_id"]]
    data = crops[(crops["status"] == "kept") & crops["class_label"].notna()].copy()
    data["train_image_id"] = data["crop_id"]  # as the dataset stage sets it from the crop manifest
    classes = sorted(data["class_label"].unique())
    doc = {"version": DATASET_VERSION, "classes": classes, "num_classes": len(classes)}
    export_tfrecords(data[["image_id", "train_image_id", "class_label", "split", "listing_id", "status"]],
                     store, doc, size=SIZE, shard_images=64)
    write_classes(store, doc)
    lap("dataset")

    trained = train_classifier(uri, TRAIN, argv=["pytest", "tests/test_serve_e2e.py"], log=lambda _line: None)
    lap("train")
    evaluation = evaluate_version(uri, trained["version"], DATASET_VERSION, calibrate=True, full=False)
    decision = promote_if_better(uri, trained["version"])
    lap("evaluate")
    return {"uri": uri, "settings": settings, "registry": registry, "photos": photos, "p_car": p_car,
            "crops": crops, "data": data, "classes": classes, "car_filter": trained_cf, "detector": detector,
            "held_out": hits, "trained": trained,
            "evaluation": evaluation, "decision": decision, "seconds": seconds, "threshold": threshold}


def test_api_top5_matches_the_evaluation_on_the_test_photos(pipeline):
    """Every test-split photo POSTed as its original bytes: the true class is in the API's
    top-5 at the evaluation's test top-5 rate (and top-1 at its top-1), within a tolerance;
    each answer names the registry's latest versions; the box is the crop stage's box and
    p_car the scoring stage's."""
    from serve.app import create_app
    from tasks.evaluation import iou

    p = pipeline
    registry = p["registry"]
    ev = p["evaluation"]
    latest = {kind: registry.latest(kind).version for kind in ("car_filter", "detector", "classifier")}
    assert latest == {"car_filter": p["car_filter"]["version"], "detector": p["detector"]["version"],
                      "classifier": p["trained"]["version"]} and p["decision"].promoted
    # the detector finds the demo cars: held-out photos, and the crops the dataset is made of
    assert p["held_out"]["iou50_rate"] >= 0.8, p["held_out"]
    test = p["data"][p["data"]["split"] == "test"]
    ious = [iou(b, p["photos"][i]["bbox"]) for i, b in zip(test["image_id"], test["bbox"], strict=True)
            if p["photos"][i]["is_car"]]
    assert np.mean([i >= 0.5 for i in ious]) >= 0.8, ious
    assert len(test) == ev["n_test"] >= 40, (len(test), ev["n_test"])
    temperature = registry.latest("classifier").meta["temperature"]
    assert temperature == pytest.approx(ev["temperature"]) and temperature != 1.0

    def ask(row) -> dict:
        photo = p["photos"][row.image_id]
        r = httpx.post(f"{base}/predict", files={"file": (Path(photo["url"]).name, photo["data"], "image/jpeg")},
                       timeout=120)
        body = r.json()
        return {"image_id": row.image_id, "truth": row.class_label, "bbox": list(row.bbox), "code": r.status_code,
                "status": body["status"], "reason": body.get("reason"), "p_car": body.get("p_car"),
                "fix_actions": body.get("fix_actions"),
                "box": body.get("box"), "versions": body.get("versions"), "batch_size": body.get("batch_size"),
                "top": [t["label"] for t in body.get("top", [])],
                "probs": [t["probability"] for t in body.get("top", [])]}

    app = create_app(p["settings"])
    with running(app, timeout=300) as base:
        version = httpx.get(f"{base}/version", timeout=30).json()
        started = time.monotonic()
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(ask, test.itertuples()))
        api_seconds = time.monotonic() - started
    assert version["versions"] == latest and version["labels"] == len(p["classes"])

    ok = [a for a in answers if a["status"] == "ok"]
    n = len(answers)
    api_top5 = sum(a["truth"] in a["top"] for a in ok) / n
    api_top1 = sum(a["top"][0] == a["truth"] for a in ok) / n
    diffs = np.array([abs(a["p_car"] - float(p["p_car"][a["image_id"]])) for a in answers if a["p_car"] is not None])
    report = (f"test photos {n} (refused {n - len(ok)}: {[a['reason'] for a in answers if a['status'] != 'ok']}); "
              f"top-5 API {api_top5:.3f} vs evaluation {ev['top5']:.3f}; top-1 API {api_top1:.3f} vs evaluation "
              f"{ev['top1']:.3f} (chance {1 / len(p['classes']):.2f}, top-5 {5 / len(p['classes']):.2f}); "
              f"|p_car API - scoring stage| mean {diffs.mean():.2e} max {diffs.max():.2e}; API {api_seconds:.1f}s for "
              f"{n} requests, largest batch {max(a['batch_size'] or 0 for a in answers)}; held-out boxes "
              f"{p['held_out']['iou50_rate']:.0%} IoU>=0.5; pipeline seconds {json.dumps(p['seconds'])}")
    print(report)
    assert all(a["versions"] == latest for a in answers), report
    assert all(a["code"] == 200 and len(a["top"]) == 5 for a in ok), report
    # the same detector and crop settings as the crop stage: the same box
    assert all(a["box"] == a["bbox"] for a in ok), [(a["box"], a["bbox"]) for a in ok if a["box"] != a["bbox"]]
    # the scoring stage's p_car: the same stored bytes (the fixer keeps these clean JPEGs as
    # they are) through the same decode + resize (CarFilterPredictor.preprocess = the
    # scoring stage's decode_resize) and the same runtime
    as_is = [a for a in answers if a["p_car"] is not None and a["fix_actions"] == []]
    assert len(as_is) == n, report
    assert max(abs(a["p_car"] - float(p["p_car"][a["image_id"]])) for a in as_is) < 1e-5, report
    # calibrated probabilities, best first
    assert all(a["probs"] == sorted(a["probs"], reverse=True) and sum(a["probs"]) <= 1 + 1e-6 for a in ok)

    # Tolerance: the API classifies the crop cut from the freshly decoded upload, while the
    # evaluation reads the export's JPEG (the crop stage's JPEG at q95, downscaled and
    # re-encoded at q90): two lossy steps the API does not take. Measured on the same model
    # and photos: pixels differ by 3 levels on average, and this small from-scratch model
    # changes its top-1 on 18% of the photos (its rate stays 0.79 both ways: flips go both
    # ways) — resampling as the export does (Lanczos, then bilinear) changed nothing, so it is
    # the JPEG noise. A rate can move by a few photos either way: allow 10 points (7 of ~70
    # photos). A broken serving path (preprocessing, label order, crop) serves at chance
    # (top-1 0.1, top-5 0.5), far outside that, and so do the floors below.
    tol = 0.10
    assert abs(api_top5 - ev["top5"]) <= tol, report
    assert abs(api_top1 - ev["top1"]) <= tol, report
    assert api_top1 >= 4 / len(p["classes"]) and api_top5 >= 0.8, report
