"""The demo's model bootstrap pieces: the ground-truth labeller for the car filter kit,
the YOLO detection dataset written from the ground truth, and the detector fine-tune
stored by content version (a second call with the same data and recipe trains nothing)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("YOLO_CONFIG_DIR", tempfile.mkdtemp(prefix="carflow-yolo-cfg-"))
os.environ.setdefault("YOLO_OFFLINE", "1")

from carflow.storage import LocalStorage  # noqa: E402
from demo.labeller import fill_labels_csv  # noqa: E402
from demo.truth import load_ground_truth  # noqa: E402
from demo.yolo import coco_names, write_yolo_dataset  # noqa: E402
from tasks.detector_train import (  # noqa: E402
    dataset_fingerprint,  # noqa: E402
    detector_version,
    train_params,
)


def test_fill_labels_csv_matches_through_source_id():
    truth = {"s-car": {"is_car": True}, "s-dash": {"is_car": False}}
    kit = "image_id,label,site,listing_id,thumb\nfixed1,,demo,demo:1,thumbs/fixed1.jpg\ns-dash,,demo,demo:2,t\nzz,,demo,demo:3,t\n"
    text, counts = fill_labels_csv(kit, {"fixed1": "s-car", "s-dash": "s-dash"}, truth)
    lines = text.splitlines()
    assert lines[0] == "image_id,label,site,listing_id,thumb"
    assert lines[1] == "fixed1,car,demo,demo:1,thumbs/fixed1.jpg"  # re-encoded photo: matched by source_id
    assert lines[2].startswith("s-dash,no_car,") and lines[3].startswith("zz,,")  # unknown: left empty
    assert counts == {"car": 1, "no_car": 1, "unknown": 1}


def test_yolo_dataset_from_ground_truth(demo_site_dir, tmp_path):
    data_yaml, held_out = write_yolo_dataset(demo_site_dir, tmp_path / "a", val_every=5)
    import yaml

    doc = yaml.safe_load(data_yaml.read_text())
    assert doc["names"] == coco_names() and doc["names"][2] == "car" and len(doc["names"]) == 80
    by_name: dict[str, dict] = {}
    for listing in load_ground_truth(demo_site_dir)["listings"]:
        for p in listing["photos"]:  # an exact duplicate repeats its original's bytes: take the original
            if p["sha256"] and p["problem"] != "exact_duplicate":
                by_name.setdefault(p["sha256"][:16], p)
    labels = {p.stem: p.read_text() for p in (tmp_path / "a" / "labels").rglob("*.txt")}
    images = {p.stem for p in (tmp_path / "a" / "images").rglob("*.jpg")}
    assert set(labels) == images and len(images) > 50
    for name, text in labels.items():
        photo = by_name[name]
        assert photo["problem"] in (None, "interior", "dashboard", "wheel", "text_banner")
        if photo["is_car"]:  # one COCO car box, normalised, inside the image
            cls, *box = text.split()
            assert cls == "2" and all(0 < float(v) <= 1 for v in box)
        else:
            assert text == ""  # a negative
    assert len(held_out) == len(list((tmp_path / "a" / "images" / "val").iterdir()))
    assert abs(len(held_out) - len(images) / 5) <= 1 and all("data" in p for p in held_out)
    # the version of a fine-tune follows content, not the folder it was written to
    again, _ = write_yolo_dataset(demo_site_dir, tmp_path / "b", val_every=5)
    assert dataset_fingerprint(again) == dataset_fingerprint(data_yaml)
    some = sorted((tmp_path / "b" / "labels" / "train").iterdir())[0]
    some.write_text("2 0.5 0.5 0.2 0.2\n" if some.read_text() == "" else "")
    assert dataset_fingerprint(again) != dataset_fingerprint(data_yaml)
    # nothing held out: val names the training images
    none_yaml, none_held = write_yolo_dataset(demo_site_dir, tmp_path / "c", val_every=0)
    assert none_held == [] and yaml.safe_load(none_yaml.read_text())["val"] == "images/train"


def test_detector_version_follows_data_and_recipe():
    p = train_params(epochs=3)
    assert p["epochs"] == 3 and p["model"] == "yolov5nu.yaml"
    v = detector_version("abc", p)
    assert v == detector_version("abc", {**p, "device": "cuda:0", "workers": 4})  # run-only options
    assert v != detector_version("abc", {**p, "epochs": 4}) and v != detector_version("abd", p)


def test_crop_weights_latest_is_the_registered_fine_tune(tmp_path):
    """``crop.weights=latest`` → the registry's latest detector: a path on local storage;
    with nothing registered, an error naming the setting and the command that makes one."""
    from carflow.registry import Registry
    from models.detector import DetectorWeightsError, registered_weights, resolve_weights

    store = LocalStorage(tmp_path)
    with pytest.raises(DetectorWeightsError, match=r"crop.weights.*carflow crop train"):
        registered_weights("latest", store)
    registry = Registry(store)
    registry.promote("detector", registry.put_version("detector", {"weights.pt": b"w1"}, {}, version="v1"))
    registry.put_version("detector", {"weights.pt": b"w2"}, {}, version="v2")  # not promoted
    path = registered_weights("latest", store)
    assert path == str(tmp_path.resolve() / "models/detector/v1/weights.pt")
    assert resolve_weights(path) == path
    assert registered_weights("yolov5su.pt", store) == "yolov5su.pt"  # other specs unchanged


@pytest.mark.integration
def test_finetune_stores_a_version_and_reuses_it(demo_site_dir, tmp_path, s3_uri, monkeypatch):
    """One tiny epoch into S3 (moto): weights.pt + meta.json under the content version,
    loadable by the crop path; the same data and recipe again → the stored version, no
    training (ultralytics' YOLO is never constructed)."""
    from carflow.storage import open_storage
    from models.detector import clear_cache, load_detector
    from tasks.detector_train import finetune_detector
    from tasks.evaluation import box_hits

    data_yaml, held_out = write_yolo_dataset(demo_site_dir, tmp_path / "yolo")
    store = open_storage(s3_uri)
    recipe = {"epochs": 1, "imgsz": 64, "batch": 16, "device": "cpu"}
    first = finetune_detector(store, data_yaml, recipe)
    assert first["cached"] is False and first["weights"].startswith("s3://")
    assert store.exists(f"models/detector/{first['version']}/weights.pt")
    config = json.loads(store.get_text(f"models/detector/{first['version']}/meta.json"))
    assert config["params"]["epochs"] == 1 and config["data_fingerprint"] == dataset_fingerprint(data_yaml)
    assert json.loads(store.get_text("models/detector/latest.json"))["version"] == first["version"]
    clear_cache()
    assert load_detector(first["weights"]).names[2] == "car"  # COCO head: drops into the cropper
    hits = box_hits(held_out[:4], first["weights"], 64, conf=0.0)
    assert hits["photos"] == 4

    import ultralytics

    monkeypatch.setattr(ultralytics, "YOLO", lambda *_a, **_k: pytest.fail("trained again"))
    rewritten, _ = write_yolo_dataset(demo_site_dir, Path(tmp_path / "elsewhere"))
    again = finetune_detector(store, rewritten, {**recipe, "device": None})
    assert again["cached"] is True and again["version"] == first["version"]
