"""Class list: year collapse, merge map, ignore list, label conflicts, rare classes,
classes.json versioning (pure pandas, fast)."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from carflow.registry import Registry
from carflow.settings import ClassesSettings
from carflow.storage import open_storage
from tasks.classes import (
    ClassesError,
    assign_classes,
    base_labels,
    classes_document,
    load_merge_map,
    write_classes,
)


def _rows(spec: list[tuple[str, str, int | None, int]], start: int = 0) -> pd.DataFrame:
    """(make, model, year, n images) → one row per image, one listing per 4 images."""
    rows = []
    i = start
    for make, model, year, n in spec:
        for _ in range(n):
            rows.append(
                {
                    "image_id": f"img{i:06d}",
                    "listing_id": f"demo:{i // 4:05d}-{make}-{model}",
                    "make": make,
                    "model": model,
                    "year": year,
                    "label": f"{make}_{model}_{year}" if year else f"{make}_{model}",
                    "status": "kept",
                    "reason": None,
                    "dup_cluster": f"img{i:06d}",
                    "label_conflict": False,
                }
            )
            i += 1
    return pd.DataFrame(rows)


def test_year_variants_collapse_by_default():
    df = _rows([("mercedes-benz", "v", 2016, 3), ("mercedes-benz", "v", 2017, 2), ("bmw", "x5", None, 1)])
    assert set(base_labels(df)) == {"mercedes-benz_v", "bmw_x5"}
    out, info = assign_classes(df, ClassesSettings(min_images=1))
    assert info["counts"] == {"bmw_x5": 1, "mercedes-benz_v": 5}
    out, info = assign_classes(df, ClassesSettings(min_images=1, merge_years=False))
    assert info["counts"] == {"bmw_x5": 1, "mercedes-benz_v_2016": 3, "mercedes-benz_v_2017": 2}


def test_label_column_fallback_strips_year():
    df = _rows([("ford", "ranger", 2015, 2)])
    df["make"] = None
    df["model"] = None
    assert set(base_labels(df)) == {"ford_ranger"}
    assert set(base_labels(df, merge_years=False)) == {"ford_ranger_2015"}


def test_merge_map_shapes_and_chains(tmp_path):
    path = tmp_path / "merge.yaml"
    path.write_text("volkswagen_golf:\n  - VW_Golf-Plus\n  - seat_leon\nseat_leon-st: seat_leon\n")
    m = load_merge_map(path)
    assert m == {"seat_leon": "volkswagen_golf", "seat_leon-st": "volkswagen_golf", "vw_golf-plus": "volkswagen_golf"}
    with pytest.raises(ClassesError, match="cycle"):
        load_merge_map({"a_b": "c_d", "c_d": "a_b"})
    with pytest.raises(ClassesError, match="both"):
        load_merge_map({"x_y": ["a_b"], "z_w": ["a_b"]})
    with pytest.raises(ClassesError, match="MERGE_MAP"):
        load_merge_map(tmp_path / "missing.yaml")


def test_merge_ignore_and_rare():
    df = _rows(
        [
            ("volkswagen", "golf", 2014, 6),
            ("seat", "leon", 2015, 5),
            ("bmw", "x5", 2013, 12),
            ("dacia", "logan", 2019, 20),
            ("ford", "ka", 2010, 3),
        ]
    )
    cfg = ClassesSettings(min_images=10, ignore=["dacia_*"])
    out, info = assign_classes(df, cfg, merge_map={"seat_leon": "volkswagen_golf"})
    assert info["counts"] == {"bmw_x5": 12, "volkswagen_golf": 11}
    assert info["rare"] == {"ford_ka": 3}
    reasons = out.groupby("class_label")["reason"].agg(lambda s: set(s.dropna()))
    assert reasons["dacia_logan"] == {"ignored_class"}
    assert reasons["ford_ka"] == {"rare_class"}
    assert out.loc[out["make"] == "seat", "class_label"].eq("volkswagen_golf").all()
    doc = classes_document(info, cfg)
    assert doc["classes"] == ["bmw_x5", "volkswagen_golf"]
    assert doc["merges_applied"] == {"seat_leon": "volkswagen_golf"}
    assert doc["dropped_classes"] == {"ford_ka": 3}


def test_rare_counts_only_kept_rows():
    df = _rows([("bmw", "x5", 2013, 12)])
    df.loc[df.index[:4], ["status", "reason"]] = ["dropped", "duplicate"]
    _, info = assign_classes(df, ClassesSettings(min_images=10))
    assert info["counts"] == {} and info["rare"] == {"bmw_x5": 8}


def _conflict_frame() -> pd.DataFrame:
    df = _rows([("bmw", "x5", 2013, 3), ("bmw", "x6", 2013, 1), ("audi", "a4", 2012, 1), ("audi", "a6", 2012, 1)])
    # cluster A: three x5 rows + one x6 row (majority x5); cluster B: a4 vs a6 (tie)
    df["dup_cluster"] = ["A", "A", "A", "A", "B", "B"]
    df["label_conflict"] = True
    df["status"] = ["kept", "dropped", "dropped", "dropped", "kept", "dropped"]
    df["reason"] = [None, "duplicate", "duplicate", "duplicate", None, "duplicate"]
    return df


def test_label_conflict_majority_vote_and_tie():
    out, info = assign_classes(_conflict_frame(), ClassesSettings(min_images=1))
    a = out[out["dup_cluster"] == "A"]
    assert a["class_label"].eq("bmw_x5").all()
    assert a["status"].tolist()[0] == "kept"
    b = out[out["dup_cluster"] == "B"]
    assert b.loc[b["status"] == "dropped", "reason"].tolist() == ["label_conflict", "duplicate"]
    assert info["conflicts"]["conflict_resolved"] == 1 and info["conflicts"]["conflict_dropped"] == 1


def test_label_conflict_drop_policy():
    out, info = assign_classes(_conflict_frame(), ClassesSettings(min_images=1, conflict_policy="drop"))
    assert (out["status"] == "dropped").all()
    assert set(out.loc[[0, 4], "reason"]) == {"label_conflict"}


def test_year_variants_are_no_conflict():
    df = _rows([("bmw", "x5", 2013, 1), ("bmw", "x5", 2014, 1)])
    df["dup_cluster"] = "A"
    df["label_conflict"] = True
    df.loc[1, ["status", "reason"]] = ["dropped", "duplicate"]
    out, info = assign_classes(df, ClassesSettings(min_images=1))
    assert info["conflicts"]["conflict_clusters"] == 0
    assert out.loc[0, "status"] == "kept"


def test_classes_json_is_versioned_by_content(tmp_path):
    df = _rows([("bmw", "x5", 2013, 3), ("audi", "a4", 2012, 3)])
    cfg = ClassesSettings(min_images=1)
    _, info = assign_classes(df, cfg)
    doc = classes_document(info, cfg)
    _, info2 = assign_classes(pd.concat([df, _rows([("bmw", "x5", 2013, 3)], start=100)]), cfg)
    assert classes_document(info2, cfg)["version"] == doc["version"]  # counts do not change it
    _, info3 = assign_classes(df, cfg, merge_map={"audi_a4": "bmw_x5"})
    assert classes_document(info3, cfg)["version"] != doc["version"]
    store = open_storage(str(tmp_path / "s"))
    version = write_classes(store, doc, {"manifest": "manifests/dataset/manifest.parquet"})
    assert version.key("classes.json") == f"datasets/{doc['version']}/classes.json"
    saved = json.loads(store.get(f"datasets/{doc['version']}/classes.json"))
    assert saved["classes"] == ["audi_a4", "bmw_x5"] and saved["counts"] == {"audi_a4": 3, "bmw_x5": 3}
    # one registry: the latest dataset resolves to it, its meta.json carries the summary
    latest = Registry(store).resolve("dataset", "latest")
    assert latest.version == doc["version"] and latest.meta["classes"] == saved["classes"]
    assert latest.meta["manifest"] == "manifests/dataset/manifest.parquet"
    assert json.loads(latest.get("classes.json")) == saved
