"""The nightly run's pure parts: the train decision, the dataset version, the funnel and
the run summary, and NightlyParams as the Prefect form and the command line. (The
nightly runs themselves are in tests/test_pipeline.py.)"""

from __future__ import annotations

import pandas as pd
import pytest

from tasks.classes import dataset_rows_hash, with_dataset_version
from tasks.nightly import funnel_line, human_count, stage_counts, summary_markdown, train_decision


def test_train_decision_follows_the_dataset_version_not_the_clock():
    assert train_decision("auto", "v1", None) == (True, "dataset v1 is new: no classifier was trained on it")
    go, why = train_decision("auto", "v1", "clf-1")
    assert go is False and "unchanged" in why and "clf-1" in why
    assert train_decision("on", "v1", "clf-1")[0] is True
    assert train_decision("off", "v1", None)[0] is False
    with pytest.raises(ValueError, match="train must be one of"):
        train_decision("sometimes", "v1", None)


def _dataset(n: int, **extra) -> pd.DataFrame:
    return pd.DataFrame({"image_id": [f"p{i}" for i in range(n)], "crop_id": [f"c{i}" for i in range(n)],
                         "class_label": ["a", "b"] * (n // 2) + ["a"] * (n % 2),
                         "split": (["train", "val", "test"] * n)[:n], **extra})


def test_dataset_version_covers_the_rows_not_their_order_or_other_columns():
    df = _dataset(10)
    doc = {"version": "classes-v", "classes": ["a", "b"]}
    v = with_dataset_version(doc, df)
    assert v["classes_version"] == "classes-v" and v["version"] != "classes-v"
    # same rows in another order, with other columns changed: same version
    shuffled = df.sample(frac=1, random_state=0).assign(first_seen=1, crawl_id="x")
    assert with_dataset_version(doc, shuffled)["version"] == v["version"]
    # a row outside every split does not count
    assert with_dataset_version(doc, pd.concat([df, _dataset(1).assign(split=None, crop_id="z")]))["version"] == \
        v["version"]
    # one more image (10% more listings), a changed label or split, or other classes: a new version
    assert with_dataset_version(doc, _dataset(11))["version"] != v["version"]
    assert with_dataset_version(doc, df.assign(class_label="a"))["version"] != v["version"]
    assert with_dataset_version(doc, df.assign(split="train"))["version"] != v["version"]
    assert with_dataset_version({**doc, "version": "classes-w"}, df)["version"] != v["version"]
    # applied twice (a doc that already has its dataset version): the same
    assert with_dataset_version(v, df)["version"] == v["version"]
    # without crop_id the photo is the train image
    assert dataset_rows_hash(df.drop(columns="crop_id")) != dataset_rows_hash(df)


def test_stage_counts_give_each_stage_its_own_drops():
    ingest = pd.DataFrame({"image_id": ["a", "b", "c", "d", "d"], "status": ["kept"] * 5, "reason": [None] * 5})
    clean = ingest.assign(status=["kept", "kept", "kept", "dropped", "dropped"],
                          reason=[None, None, None, "duplicate", "duplicate"])
    car = clean.assign(status=["kept", "kept", "dropped", "dropped", "dropped"],
                       reason=[None, None, "no_car", "duplicate", "duplicate"])
    data = car.assign(split=["train", None, None, None, None], train_image_id=["ca", "cb", None, None, None])
    counts = stage_counts({"ingest": ingest, "clean": clean, "car_filter": car, "dataset": data})
    by = {c["stage"]: c for c in counts}
    assert [c["stage"] for c in counts] == ["ingest", "clean", "car_filter", "dataset"]
    assert by["ingest"]["images"] == 4 and by["ingest"]["rows"] == 5
    assert by["clean"] == {"stage": "clean", "rows": 5, "images": 3, "kept": 3, "dropped": 2,
                           "dropped_by_reason": {"duplicate": 2}}
    assert by["car_filter"]["dropped_by_reason"] == {"no_car": 1} and by["car_filter"]["images"] == 2
    # the dataset: "b" is kept but in no split
    assert by["dataset"]["images"] == 1 and by["dataset"]["dropped_by_reason"] == {"not_in_split": 1}


def test_funnel_is_written_as_the_seeds_wrote_it():
    assert [human_count(n) for n in (1_600_000, 691_000, 12_345, 950)] == ["1.6 M", "691k", "12.3k", "950"]
    counts = [{"stage": "ingest", "images": 1_600_000}, {"stage": "crop", "images": 691_000}]
    assert funnel_line(counts) == "ingest 1.6 M → crop 691k (43%)"
    assert funnel_line([]) == ""
    md = summary_markdown("Nightly run", [{**c, "rows": c["images"], "kept": c["images"], "dropped": 1,
                                           "dropped_by_reason": {"no_vehicle": 1}} for c in counts],
                          ["training: skipped"], {"evaluation report.md": "file:///r/report.md", "none": None})
    assert "ingest 1.6 M → crop 691k (43%)" in md and "- training: skipped" in md
    assert "| crop | 691000 | 691000 | 691000 | 1 | no_vehicle: 1 |" in md
    assert "[evaluation report.md](file:///r/report.md)" in md and "[none]" not in md


def test_nightly_form_has_typed_described_fields_and_names_a_bad_field():
    from flows.params import parse_params
    from flows.pipeline import NightlyParams, nightly, parser

    schema = nightly.parameters.model_dump()
    props = schema["definitions"]["NightlyParams"]["properties"]
    for name in NightlyParams.model_fields:
        assert props[name].get("description"), name
    assert props["train"]["enum"] == ["auto", "on", "off"] and props["min_images"]["anyOf"][0]["type"] == "integer"
    p = parse_params(NightlyParams, parser().parse_args(["--base-url", "demo=http://127.0.0.1:1", "--train", "off",
                                                         "--refresh", "clean", "crop"]))
    assert p.base_urls == {"demo": "http://127.0.0.1:1"} and p.train == "off" and p.refresh == ["clean", "crop"]
    with pytest.raises(Exception, match="--min-images"):
        parse_params(NightlyParams, parser().parse_args(["--min-images", "0"]))
    with pytest.raises(Exception, match="train"):
        NightlyParams(train="sometimes")
