"""Evaluation: metrics, calibration, the label-problem finders on the demo's planted
problems, the stored artifacts and champion/challenger.

The finders need out-of-sample probabilities of a real model on real pixels: a logistic
regression on colour histograms of the demo marketplace's car crops, cross-validated
(scikit-learn's ``cross_val_predict``), a few seconds on a CPU.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from carflow import keys
from carflow.registry import Registry
from carflow.settings import EvaluateSettings
from tasks import evaluate as ev


# -- the demo marketplace's car crops, with their planted label problems ---------------------------
def _feature(img: Image.Image) -> np.ndarray:
    t = np.asarray(img.convert("RGB").resize((16, 12), Image.Resampling.BOX)) // 64
    idx = (t[..., 0] * 16 + t[..., 1] * 4 + t[..., 2]).ravel()
    return np.sqrt(np.bincount(idx, minlength=64) / idx.size)


@pytest.fixture(scope="module")
def demo_crops(tmp_path_factory):
    """Every clean car photo of `make demo`'s marketplace layout (60 listings, 6 classes; small
    photos to keep it quick), cropped to its true box: features, the *seller's* class, JPEG
    bytes, and which images the ground truth says were planted as mislabelled."""
    from demo.generate import generate_site

    root = tmp_path_factory.mktemp("eval-site")
    gt = generate_site(root, seed=0, n_listings=60, n_classes=6, image_size=(128, 96))
    seen, rows = set(), []
    for lst in gt["listings"]:
        if not lst["label"]:
            continue
        for p in lst["photos"]:
            if p["is_car"] and p["problem"] is None and p["sha256"] not in seen:
                seen.add(p["sha256"])
                rows.append((lst, p))
    classes = sorted({lst["class_key"] for lst, _ in rows})
    crops = [Image.open(root / p["url"].lstrip("/")).convert("RGB").crop(tuple(p["bbox"])) for _, p in rows]
    jpegs = []
    for c in crops:
        buf = io.BytesIO()
        c.save(buf, "JPEG", quality=85)
        jpegs.append(buf.getvalue())
    planted = set(gt["label_problems"]["mislabelled"]["images"])
    return {
        "gt": gt,
        "classes": classes,
        "x": np.stack([_feature(c) for c in crops]),
        "y": np.array([classes.index(lst["class_key"]) for lst, _ in rows]),
        "planted": np.array([p["sha256"] in planted for _, p in rows]),
        "ids": [p["sha256"] for _, p in rows],
        "listings": [lst["listing_id"] for lst, _ in rows],
        "jpegs": jpegs,
    }


@pytest.fixture(scope="module")
def out_of_sample(demo_crops):
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    cv = StratifiedKFold(5, shuffle=True, random_state=0)
    return cross_val_predict(LogisticRegression(max_iter=1000, C=10), demo_crops["x"], demo_crops["y"], cv=cv,
                             method="predict_proba")


def test_demo_plants_both_label_problems_and_nothing_else_changes(tmp_path):
    """On by default: mislabelled listings (cars of class 0 on pages of class 1) and a
    look-alike pair; off, every listing, label and count is the same, and only the planted
    photos' bytes differ."""
    from demo.generate import generate_site

    on = generate_site(tmp_path / "on", seed=2, n_listings=24, n_classes=4, image_size=(96, 72))
    off = generate_site(tmp_path / "off", seed=2, n_listings=24, n_classes=4, image_size=(96, 72),
                        label_problems=False)
    lp = on["label_problems"]
    assert "label_problems" not in off
    mis = lp["mislabelled"]
    assert (mis["true_class"], mis["labelled_as"]) == ("volkswagen_golf", "mercedes-benz_v-class")
    assert len(mis["listings"]) >= 2 and len(mis["images"]) >= 2 * 3
    assert lp["look_alike"] == {"classes": ["bmw_3-series", "ford_ranger"], "drawn_as": "ford_ranger"}
    by_id = {x["listing_id"]: x for x in on["listings"]}
    for lid in mis["listings"]:  # the page says v-class, the photos show golfs
        assert by_id[lid]["class_key"] == "mercedes-benz_v-class"
        assert {p["class_key"] for p in by_id[lid]["photos"] if p["is_car"] and not p["problem"]} == {"volkswagen_golf"}
    assert on["counts"] == off["counts"]
    assert [x["label"] for x in on["listings"]] == [x["label"] for x in off["listings"]]
    changed = {(a["sha256"], b["sha256"]) for x, y in zip(on["listings"], off["listings"])
               for a, b in zip(x["photos"], y["photos"]) if a["sha256"] != b["sha256"]}
    look_alike = {p["sha256"] for x in on["listings"] for p in x["photos"] if p["class_key"] == "bmw_3-series"}
    assert {a for a, _ in changed} <= set(mis["images"]) | look_alike
    assert set(mis["images"]) <= {a for a, _ in changed}


def test_planted_mislabelled_images_rank_clearly_above_random(demo_crops, out_of_sample):
    from sklearn.metrics import average_precision_score

    y, planted = demo_crops["y"], demo_crops["planted"]
    assert planted.sum() >= 6
    issues, quality = ev.rank_label_issues(y, out_of_sample)
    assert len(issues) and len(set(issues.tolist())) == len(issues)
    # the ranking: the issue list in its order, then everything else by label quality
    rank = np.empty(len(y))
    rest = np.setdiff1d(np.arange(len(y)), issues)
    rank[issues] = np.arange(len(issues))
    rank[rest] = len(issues) + np.argsort(np.argsort(quality[rest]))
    ap = average_precision_score(planted, -rank)
    base = planted.mean()  # what a random order scores
    recall = planted[issues].sum() / planted.sum()
    print(f"planted {planted.sum()}/{len(y)}; AP {ap:.3f} vs random {base:.3f}; "
          f"{planted[issues].sum()} in the list of {len(issues)}; first ranks {sorted(rank[planted].astype(int))}")
    assert ap >= max(10 * base, 0.5)
    assert recall >= 0.6
    assert planted[issues[: int(planted.sum())]].mean() >= 0.5


def test_look_alike_pair_is_the_top_suggested_merge(demo_crops, out_of_sample):
    from tasks.classes import load_merge_map

    classes, y = demo_crops["classes"], demo_crops["y"]
    look = demo_crops["gt"]["label_problems"]["look_alike"]["classes"]
    merges = ev.suggest_merges(y, out_of_sample, classes)
    assert merges, "no merge suggested"
    assert sorted(merges[0]["classes"]) == sorted(look)
    # the planted one-way mislabelling (golf photos on v-class pages) is no merge
    assert all(sorted(m["classes"]) != ["mercedes-benz_v-class", "volkswagen_golf"] for m in merges)
    counts = {c: int((y == i).sum()) for i, c in enumerate(classes)}
    snippet = ev.merge_map_yaml(merges[:1], counts)
    target = max(look, key=lambda c: (counts[c], c == min(look)))
    source = next(c for c in look if c != target)
    assert load_merge_map(__import__("yaml").safe_load(snippet)) == {source: target}


# -- calibration ------------------------------------------------------------------------------------
def _fit_logits(x, y, train, C=10):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(max_iter=1000, C=C).fit(x[train], y[train]).decision_function(x)


def test_temperature_scaling_lowers_ece_of_an_overconfident_model(demo_crops):
    x, y = demo_crops["x"], demo_crops["y"]
    part = np.arange(len(y)) % 4
    logits = 5.0 * _fit_logits(x, y, part < 2)  # deliberately over-confident
    val, test = part == 2, part == 3
    t = ev.fit_temperature(logits[val], y[val])
    assert t > 1.5
    before = ev.expected_calibration_error(ev.softmax(logits[test]), y[test])
    after = ev.expected_calibration_error(ev.softmax(logits[test], t), y[test])
    print(f"T={t:.2f} ECE {before:.3f} -> {after:.3f}")
    assert after <= before
    assert (ev.softmax(logits[test], t).argmax(1) == logits[test].argmax(1)).all()
    assert ev.nll(logits[test], y[test], t) < ev.nll(logits[test], y[test])


def test_temperature_recovers_a_known_overconfidence():
    """Labels drawn from softmax(z): z is calibrated (T ≈ 1); a model that outputs 5·z is
    over-confident by exactly 5, and the fitted T finds it and removes most of the ECE."""
    rng = np.random.default_rng(0)
    z = rng.normal(0, 2, size=(6000, 5))
    p = ev.softmax(z)
    y = (p.cumsum(1) < rng.random((len(z), 1))).sum(1)  # one draw per row from p
    assert 0.9 < ev.fit_temperature(z[:3000], y[:3000]) < 1.1
    t = ev.fit_temperature(5 * z[:3000], y[:3000])
    assert 4.5 < t < 5.5
    before = ev.expected_calibration_error(ev.softmax(5 * z[3000:]), y[3000:])
    after = ev.expected_calibration_error(ev.softmax(5 * z[3000:], t), y[3000:])
    assert after <= before / 3 and after < 0.03


def test_multilabel_metrics_and_temperature():
    """Tags drawn from sigmoid(z); the model says 5·z: T ≈ 5 on the sigmoids, and the
    per-label report, binary and subset accuracy are there."""
    rng = np.random.default_rng(1)
    z = rng.normal(-1, 2, size=(4000, 4))
    y = (rng.random(z.shape) < ev.sigmoid(z)).astype(int)
    names = ["dent", "scratch", "glass", "rust"]
    m = ev.multilabel_metrics(y[:2000], ev.sigmoid(5 * z[:2000]), names)
    decisions = (z[:2000] >= 0) == (y[:2000] > 0)
    assert m["binary_accuracy"] == pytest.approx(decisions.mean())
    assert m["subset_accuracy"] == pytest.approx(decisions.all(1).mean())
    assert set(m["report"]) >= {*names, "micro avg"}
    t = ev.fit_temperature(5 * z[:2000], y[:2000], task="multilabel")
    assert 4.5 < t < 5.5
    before = ev.expected_calibration_error(ev.sigmoid(5 * z[2000:]), y[2000:], task="multilabel")
    after = ev.expected_calibration_error(ev.sigmoid(5 * z[2000:], t), y[2000:], task="multilabel")
    assert after <= before / 3


def test_multilabel_evaluation_writes_its_artifacts(local_uri):
    from carflow.storage import open_storage

    store = open_storage(local_uri)
    version = Registry(store).put_version("classifier", {"config.json": "{}"}, version="tags")
    rng = np.random.default_rng(2)
    z = rng.normal(-1, 2, size=(400, 3))
    y = (rng.random(z.shape) < ev.sigmoid(z)).astype(int)

    def preds(rows, split):
        return ev.Predictions(split, 5 * z[rows], y[rows], [f"img{i}" for i in rows], ["l"] * len(rows),
                              ["x"] * len(rows), [("mem", int(i)) for i in rows])

    s = ev.write_evaluation(version, ["dent", "scratch", "rust"], preds(np.arange(200), "val"),
                            preds(np.arange(200, 400), "test"), "ds", task="multilabel")
    ev.record_evaluation(version, s)
    assert {"metrics.json", "report.md", "reliability.png", "label_issues.csv", "label_issues.png"} <= set(s["files"])
    assert 4 < s["temperature"] < 6 and s["ece_after"] < s["ece_before"]
    meta = Registry(store).get("classifier", "tags").meta
    assert meta["metrics"]["binary_accuracy"] == s["binary_accuracy"] and meta["temperature"] == s["temperature"]


# -- headline metrics and pictures ---------------------------------------------------------------
def test_headline_metrics_by_hand():
    classes = ["a", "b", "c", "d", "e", "f"]
    y = np.array([0, 1, 2, 3])
    probs = np.full((4, 6), 0.01)
    probs[0, 0] = 0.9  # right
    probs[1, 2] = 0.9  # wrong, b is 2nd
    probs[1, 1] = 0.05
    probs[2, 2] = 0.9  # right
    probs[3, [0, 1, 2, 4, 5]] = [0.3, 0.25, 0.2, 0.15, 0.1]  # wrong, d is 6th
    m = ev.headline_metrics(y, probs / probs.sum(1, keepdims=True), classes)
    assert m["top1"] == 0.5 and m["top5"] == 0.75 and m["n"] == 4 and m["classes_in_test"] == 4
    # per class F1 over the 4 test classes: a 2/3 (one d predicted as a), b 0, c 2/3, d 0
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0 + 2 / 3 + 0) / 4)
    assert m["report"]["c"]["precision"] == 0.5 and m["report"]["c"]["recall"] == 1.0
    rows = {line.split()[0] for line in m["report_text"].splitlines()[1:] if line.strip()}
    assert rows == {"a", "b", "c", "d", "accuracy", "macro", "weighted"}  # the test split's classes


def test_confusion_png_stays_readable_at_500_classes():
    rng = np.random.default_rng(0)
    n = 500
    cm = np.diag(rng.integers(15, 25, size=n))
    planted = [(3, 77), (77, 3), (120, 450), (9, 10)]
    for a, b in planted:
        cm[a, b] += 8
    noise = rng.integers(0, n, size=(300, 2))
    for a, b in noise:
        if a != b:
            cm[a, b] += 1
    names = [f"make{i}_model{i}" for i in range(n)]
    keep = ev.confused_subset(cm, 40)
    assert len(keep) == 40 and {3, 77, 120, 450, 9, 10} <= set(keep.tolist())
    pairs = ev.most_confused_pairs(cm, names, 4)
    assert {(p["true_index"], p["predicted_index"]) for p in pairs} == set(planted)
    png = ev.confusion_png(cm, names, 40)
    with Image.open(io.BytesIO(png)) as im:
        im.load()
        assert max(im.size) <= 1800  # 40 labelled rows, not 500 unreadable ones
    with Image.open(io.BytesIO(ev.per_class_accuracy_png(cm, names))) as im:
        im.load()
        assert im.size[1] <= 1800


# -- the stored evaluation and champion/challenger -------------------------------------------------
def _predictions(demo_crops, logits, rows, split):
    y = demo_crops["y"]
    return ev.Predictions(split, logits[rows], y[rows], [demo_crops["ids"][i] for i in rows],
                          [demo_crops["listings"][i] for i in rows],
                          [demo_crops["classes"][y[i]] for i in rows], [("mem", int(i)) for i in rows])


def _register(store, name: str, classes) -> object:
    return Registry(store).put_version(
        "classifier", {"labels.json": json.dumps(classes), "config.json": json.dumps({"temperature": 1.0})},
        meta={"command": f"test {name}"}, version=name)


def _evaluate(store, demo_crops, version, logits, rows_val, rows_test, calibrate=True):
    val = _predictions(demo_crops, logits, rows_val, "val")
    test = _predictions(demo_crops, logits, rows_test, "test")

    def images(preds, wanted):
        return {(w, r): demo_crops["jpegs"][preds[w].sources[r][1]] for w, r in wanted}

    summary = ev.write_evaluation(version, demo_crops["classes"], val, test, "ds1", EvaluateSettings(), images=images,
                                  calibrate=calibrate)
    ev.record_evaluation(version, summary, calibrate)
    return summary


def test_evaluation_writes_every_artifact(storage, demo_crops):
    x, y = demo_crops["x"], demo_crops["y"]
    part = np.arange(len(y)) % 4
    logits = 4.0 * _fit_logits(x, y, part < 2)
    version = _register(storage, "v1", demo_crops["classes"])
    s = _evaluate(storage, demo_crops, version, logits, np.where(part == 2)[0], np.where(part == 3)[0])

    base = version.key(keys.eval_name("ds1"))
    stored = set(storage.list(base + "/"))
    for name in ("metrics.json", "report.md", "classification_report.json", "classification_report.txt",
                 "confusion.png", "per_class_accuracy.png", "reliability.png", "merge_map.yaml",
                 "label_issues.csv", "label_issues.png"):
        assert f"{base}/{name}" in stored, name
    pngs = [k for k in stored if k.endswith(".png")]
    assert any("/confused/" in k for k in pngs) and len(pngs) >= 5
    for k in pngs:
        with Image.open(io.BytesIO(storage.get(k))) as im:
            im.load()
            assert im.size[0] > 50 and im.size[1] > 50
    metrics = json.loads(storage.get(f"{base}/metrics.json"))
    assert metrics["top1"] == pytest.approx((logits[part == 3].argmax(1) == y[part == 3]).mean())
    assert metrics["n_test"] == int((part == 3).sum()) and metrics["ece_after"] <= metrics["ece_before"]
    assert metrics["confused_pairs"] and metrics["confused_pairs"][0]["image_ids"]
    assert set(json.loads(storage.get(f"{base}/classification_report.json"))) >= set(demo_crops["classes"])
    # the temperature lives with the model, in config.json (what the predictor reads) and meta.json
    meta = Registry(storage).get("classifier", "v1").meta
    config = json.loads(storage.get(version.key("config.json")))
    assert config["temperature"] == pytest.approx(s["temperature"]) == pytest.approx(meta["temperature"])
    assert s["temperature"] > 1.5
    assert meta["metrics"]["top1"] == metrics["top1"] and meta["evaluations"]["ds1"]["test_split"] == s["test_split"]
    report = storage.get(f"{base}/report.md").decode()
    assert "top-1" in report and "confusion.png" in report and "classification_report" in report


def test_champion_challenger(local_uri, demo_crops):
    from carflow.storage import open_storage

    store = open_storage(local_uri)
    reg = Registry(store)
    x, y = demo_crops["x"], demo_crops["y"]
    part = np.arange(len(y)) % 4
    good = _fit_logits(x, y, part < 2)
    rng = np.random.default_rng(0)
    bad = good + rng.normal(0, 3 * good.std(), size=good.shape)  # the same model, much noisier
    rows_val, rows_test = np.where(part == 2)[0], np.where(part == 3)[0]

    def evaluate(name, logits):
        v = _register(store, name, demo_crops["classes"])
        _evaluate(store, demo_crops, v, logits, rows_val, rows_test)
        return reg.get("classifier", name).meta["metrics"]["top1"]

    top_good, top_bad = evaluate("good", good), evaluate("bad", bad)
    assert top_bad < top_good

    first = ev.promote_if_better(store, "good")
    assert first.promoted and reg.latest("classifier").version == "good"

    worse = ev.promote_if_better(store, "bad")
    assert not worse.promoted and reg.latest("classifier").version == "good"
    assert (worse.candidate_value, worse.incumbent_value) == (pytest.approx(top_bad), pytest.approx(top_good))
    recorded = json.loads(store.get(keys.version_key("classifier", "bad", "promotion.json")))
    assert recorded["promoted"] is False and recorded["candidate_value"] == pytest.approx(top_bad)
    assert recorded["incumbent_value"] == pytest.approx(top_good) and recorded["incumbent"] == "good"
    assert reg.get("classifier", "bad").meta["promotion"]["forced"] is False

    forced = ev.promote_if_better(store, "bad", force=True)
    assert forced.promoted and forced.reason.startswith("forced") and reg.latest("classifier").version == "bad"
    assert reg.get("classifier", "bad").meta["promotion"]["forced"] is True

    better = ev.promote_if_better(store, "good")
    assert better.promoted and reg.latest("classifier").version == "good"
    assert (better.candidate_value, better.incumbent_value) == (pytest.approx(top_good), pytest.approx(top_bad))


def test_promote_needs_an_evaluation(local_uri, demo_crops):
    from carflow.storage import open_storage

    store = open_storage(local_uri)
    _register(store, "raw", demo_crops["classes"])
    with pytest.raises(ev.EvaluationError, match="carflow evaluate --model raw"):
        ev.promote_if_better(store, "raw")


def test_evaluate_without_a_classifier_is_one_line(local_uri, capsys):
    from flows.cli import main

    assert main(["evaluate", "--storage", local_uri]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no classifier has been registered" in err and "carflow train" in err
    from carflow.storage import open_storage

    Registry(open_storage(local_uri)).promote("classifier", _register(open_storage(local_uri), "v1", ["a", "b"]))
    assert main(["evaluate", "--storage", local_uri]) == 2  # a model, but no dataset export
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "carflow dataset --tfrecord" in err


# -- end to end: a tiny trained Keras classifier, registered, on a real dataset export ---------------
SIZE = 32


def _export_df(store, demo_crops, max_listing: int, splits: dict[int, str] | None = None):
    """Dataset rows of the demo crops (listing n's split: n % 5 → ``splits``, default val 3,
    test 4, else train; stable, as the split stage keeps it) for listings numbered below
    ``max_listing``."""
    splits = splits or {3: "val", 4: "test"}
    import pandas as pd

    rows = []
    for i, (lid, jpeg) in enumerate(zip(demo_crops["listings"], demo_crops["jpegs"])):
        n = int(lid.rsplit("-", 1)[-1])
        if n >= max_listing:
            continue
        cls = demo_crops["classes"][demo_crops["y"][i]]
        make, model = cls.split("_", 1)
        rows.append({"image_id": store.put_image(jpeg), "listing_id": lid, "make": make, "model": model, "year": 2020,
                     "label": f"{cls}_2020", "class_label": cls, "status": "kept", "reason": None,
                     "first_seen": n * 100 + i, "split": splits.get(n % 5, "train")})
    return pd.DataFrame(rows)


def _arrays(index, split):
    x, y = [], []
    for ex in index.examples(split):
        x.append(np.asarray(Image.open(io.BytesIO(ex["image"])).convert("RGB").resize((SIZE, SIZE))))
        y.append(ex["label"])
    return np.stack(x), np.asarray(y)


def _register_keras(store, name, model, classes, dataset_version, tmp_path):
    path = tmp_path / f"{name}.keras"
    model.save(path)
    return Registry(store).put_version(
        "classifier",
        {"model.keras": str(path), "labels.json": json.dumps(classes),
         "config.json": json.dumps({"image_size": SIZE, "task": "multiclass", "backbone": "tiny-test-cnn"})},
        meta={"dataset_version": dataset_version, "command": "tests/test_evaluate.py"}, version=name)


@pytest.fixture(scope="module")
def registered(demo_crops, tmp_path_factory):
    """Storage with two dataset versions (ds0: listings 1–39; ds1: all 60, splits kept), a
    champion trained on ds0 (a tiny CNN, uint8 in, logits out) and an untrained challenger."""
    from carflow.frameworks import import_keras
    from carflow.storage import open_storage
    from tasks.export import export_tfrecords, open_export

    tmp = tmp_path_factory.mktemp("eval-e2e")
    store = open_storage(str(tmp / "store"))
    classes = demo_crops["classes"]
    for name, upto in (("ds0", 40), ("ds1", 1000)):
        export_tfrecords(_export_df(store, demo_crops, upto), store, {"version": name, "classes": classes}, size=SIZE,
                         shard_images=64)
    keras = import_keras()
    keras.utils.set_random_seed(0)

    def tiny():
        inp = keras.Input((SIZE, SIZE, 3), dtype="uint8")
        x = keras.layers.Rescaling(1 / 255.0)(inp)
        x = keras.layers.Conv2D(16, 3, strides=2, activation="relu")(x)
        x = keras.layers.GlobalAveragePooling2D()(x)
        return keras.Model(inp, keras.layers.Dense(len(classes))(x))

    x, y = _arrays(open_export(store, "ds0"), "train")
    champ = tiny()
    champ.compile(optimizer=keras.optimizers.Adam(1e-2),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    champ.fit(x, y, epochs=40, batch_size=32, verbose=0)
    _register_keras(store, "champ", champ, classes, "ds0", tmp)
    _register_keras(store, "chal", tiny(), classes, "ds1", tmp)
    return store


def test_evaluate_version_end_to_end_then_champion_challenger_on_the_same_split(registered):
    from models.classifier import ClassifierPredictor

    store, reg = registered, Registry(registered)
    s = ev.evaluate_version(store, "champ", "ds0", EvaluateSettings(top_pairs=3, gallery_issues=8))
    base = keys.version_key("classifier", "champ", keys.eval_name("ds0"))
    assert s["n_test"] > 10 and s["top1"] > 0.6, s["top1"]
    for name in ("metrics.json", "report.md", "confusion.png", "per_class_accuracy.png", "reliability.png",
                 "merge_map.yaml", "label_issues.csv", "label_issues.png"):
        assert store.exists(f"{base}/{name}"), name
    for k in (k for k in store.list(base + "/") if k.endswith(".png")):
        with Image.open(io.BytesIO(store.get(k))) as im:
            im.load()
    # the galleries show real test crops, fetched back from the export's shards (an image
    # that could not be fetched would be a flat grey placeholder tile)
    galleries = [k for k in store.list(base + "/confused/")] + [f"{base}/label_issues.png"]
    assert len(galleries) >= 2
    for k in galleries:
        with Image.open(io.BytesIO(store.get(k))) as im:
            assert len(set(im.convert("RGB").getdata())) > 200, k
    print(f"champion on ds0: top-1 {s['top1']:.3f} top-5 {s['top5']:.3f} macro-F1 {s['macro_f1']:.3f}, "
          f"T {s['temperature']:.2f}, ECE {s['ece_before']:.3f} -> {s['ece_after']:.3f}, n_test {s['n_test']}")
    # the temperature is stored with the model, and the predictor serves with it
    predictor = ClassifierPredictor.load("champ", storage=store)
    assert predictor.temperature == pytest.approx(s["temperature"]) and s["temperature"] != 1.0
    assert reg.get("classifier", "champ").meta["metrics"]["dataset_version"] == "ds0"

    assert ev.promote_if_better(store, "champ").promoted
    ev.evaluate_version(store, "chal", "ds1")
    decision = ev.promote_if_better(store, "chal")
    champ_meta = reg.get("classifier", "champ").meta
    # the champion was evaluated on ds1's test split (without touching its own metrics or temperature)
    assert champ_meta["evaluations"]["ds1"]["test_split"] == reg.get("classifier", "chal").meta["metrics"]["test_split"]
    assert champ_meta["metrics"]["dataset_version"] == "ds0"
    assert champ_meta["temperature"] == pytest.approx(s["temperature"])
    assert champ_meta["evaluations"]["ds1"]["n_test"] > champ_meta["evaluations"]["ds0"]["n_test"]
    assert not decision.promoted and reg.latest("classifier").version == "champ"
    assert decision.incumbent_value == pytest.approx(champ_meta["evaluations"]["ds1"]["top1"])
    assert decision.candidate_value < decision.incumbent_value
    assert "re-evaluated" in decision.reason
    print(f"challenger vs champion on ds1: {decision.candidate_value:.3f} vs {decision.incumbent_value:.3f}: "
          f"{decision.reason}")


@pytest.mark.integration
def test_evaluate_flow_publishes_artifacts_and_forces(registered, prefect_server):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.evaluate import evaluate

    out = evaluate(storage=registered.uri(), model="chal", dataset="ds1", promote=True, force=True)
    assert out["promotion"]["promoted"] and out["promotion"]["reason"].startswith("forced")
    assert Registry(registered).latest("classifier").version == "chal"
    assert {"confusion.png", "reliability.png", "metrics.json"} <= set(out["files"])
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(
            any_=["classifier-evaluation", "classifier-per-class", "classifier-confusion"])))
    by_key = {a.key: a for a in found}
    assert set(by_key) == {"classifier-evaluation", "classifier-per-class", "classifier-confusion"}
    assert "chal" in by_key["classifier-evaluation"].data and "forced" in by_key["classifier-evaluation"].data


# -- a CV-trained version: the finders see the out-of-fold train rows too -------------------------
class _FeaturePredictor:
    """A registered version's predictor stand-in: the colour-histogram logistic regression
    on the decoded export images (log-probabilities as logits)."""

    task, temperature = "multiclass", 1.0

    def __init__(self, version: str, labels: list[str], model):
        self.version, self.labels, self.model = version, labels, model

    def logits(self, images) -> np.ndarray:
        x = np.stack([_feature(Image.fromarray(np.asarray(im))) for im in images])
        return np.log(np.clip(self.model.predict_proba(x), 1e-6, 1.0))


def test_cv_version_finders_use_out_of_fold_train_rows(demo_crops, local_uri):
    """A version trained with ``--cv``: its out-of-fold logits (``tasks.train.oof_bytes``,
    folds from ``tasks.train.cv_folds`` grouped by listing) stored beside it; the
    evaluation's cleanlab finders then see every train + val row out-of-fold plus test,
    and still find the planted mislabels and the look-alike pair. Without the file they
    see val + test only."""
    import pandas as pd
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import average_precision_score

    from carflow.storage import open_storage
    from models.classifier import OOF_FILE
    from tasks.export import export_tfrecords, open_export
    from tasks.train import cv_folds, oof_bytes

    store = open_storage(local_uri)
    classes = demo_crops["classes"]
    # the planted mislabelled listings (demo-0008, demo-0043) in train: only out-of-fold
    # probabilities can show them
    export_tfrecords(_export_df(store, demo_crops, 1000, {1: "val", 2: "test"}), store,
                     {"version": "dscv", "classes": classes}, size=128, shard_images=64)
    index = open_export(store, "dscv")
    rows = pd.DataFrame([{"image_id": ex["image_id"], "listing_id": ex["listing_id"], "label": int(ex["label"]),
                          "targets": (), "split": sp,
                          "x": _feature(Image.open(io.BytesIO(ex["image"])))}
                         for sp in ("train", "val") for ex in index.examples(sp)])
    x, y = np.stack(rows["x"]), rows["label"].to_numpy()
    oof = np.zeros((len(rows), len(classes)), np.float32)
    folds = np.zeros(len(rows), int)
    for k, held in enumerate(cv_folds(rows, 5)):
        fit = np.setdiff1d(np.arange(len(rows)), held)
        model = LogisticRegression(max_iter=1000, C=10).fit(x[fit], y[fit])
        oof[held] = np.log(np.clip(model.predict_proba(x[held]), 1e-6, 1.0))
        folds[held] = k + 1
    final = LogisticRegression(max_iter=1000, C=10).fit(x, y)  # the registered model saw val too
    reg = Registry(store)
    for name, files in (("cv", {OOF_FILE: oof_bytes(list(rows["image_id"]), list(rows["split"]), list(folds), oof)}),
                        ("plain", {})):
        reg.put_version("classifier", {"labels.json": json.dumps(classes), "config.json": "{}", **files},
                        meta={"dataset_version": "dscv"}, version=name)
    n = {sp: index.count(sp) for sp in ("train", "val", "test")}

    s = ev.evaluate_version(store, "cv", "dscv", EvaluateSettings(gallery_issues=8),
                            predictor=_FeaturePredictor("cv", classes, final))
    assert s["out_of_sample"]["n"] == n and s["out_of_sample"]["source"].startswith("out-of-fold")
    assert s["label_issues"]["examined"] == sum(n.values())
    base = reg.get("classifier", "cv").key(keys.eval_name("dscv"))
    assert f"images ({s['out_of_sample']['source']})" in store.get(f"{base}/report.md").decode()
    issues = pd.read_csv(io.BytesIO(store.get(f"{base}/label_issues.csv")))
    planted_ids = {store.put_image(j) for j, p in zip(demo_crops["jpegs"], demo_crops["planted"]) if p}
    examined_ids = [*rows["image_id"], *(ex["image_id"] for ex in index.examples("test"))]
    planted = np.array([i in planted_ids for i in examined_ids])
    found = issues["image_id"].isin(planted_ids).to_numpy()
    rank = dict(zip(issues["image_id"], issues["rank"]))
    score = np.array([len(examined_ids) - rank[i] if i in rank else 0 for i in examined_ids])
    ap, base = average_precision_score(planted, score), planted.mean()
    print(f"out-of-fold: {s['out_of_sample']}; planted {planted.sum()}/{len(planted)} "
          f"({planted[:n['train']].sum()} in train), {found.sum()} in the list of {len(issues)}; AP >= {ap:.3f} vs "
          f"random {base:.3f}; merges {[m['classes'] for m in s['suggested_merges']]}")
    assert planted[: n["train"]].sum() == planted.sum() >= 6
    assert set(issues.loc[issues["image_id"].isin(planted_ids), "split"]) == {"train"}
    assert ap >= max(10 * base, 0.5) and found.sum() / planted.sum() >= 0.6
    assert found[: int(planted.sum())].mean() >= 0.5
    look = demo_crops["gt"]["label_problems"]["look_alike"]["classes"]
    assert s["suggested_merges"] and sorted(s["suggested_merges"][0]["classes"]) == sorted(look)

    plain = ev.evaluate_version(store, "plain", "dscv", EvaluateSettings(gallery_issues=8),
                                predictor=_FeaturePredictor("plain", classes, final))
    assert plain["out_of_sample"] == {"source": "val + test", "n": {"val": n["val"], "test": n["test"]}}
    assert plain["label_issues"]["examined"] == n["val"] + n["test"]
    plain_issues = pd.read_csv(io.BytesIO(store.get(reg.get("classifier", "plain").key(
        keys.eval_name("dscv") + "/label_issues.csv"))))
    assert not plain_issues["image_id"].isin(planted_ids).any()  # val + test alone cannot see them
