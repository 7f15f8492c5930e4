"""The dataset flow (classes → split → leakage check → export) on the demo marketplace,
after the real crawl → ingest → clean, through Prefect."""

from __future__ import annotations

import io
import json

import pandas as pd
import pyarrow.parquet as pq
import pytest
from prefect import task

from carflow.manifest import manifest_key, read_manifest, to_pandas
from carflow.settings import ClassesSettings
from carflow.storage import open_storage
from tasks.classes import assign_classes
from tasks.split import SPLITS, LeakageError, check_leakage

pytestmark = pytest.mark.integration

@pytest.fixture(scope="module")
def cleaned(demo_site, tmp_path_factory, prefect_server, crawl_to_manifest) -> str:
    from flows.clean import clean

    uri = crawl_to_manifest(demo_site.url, str(tmp_path_factory.mktemp("dataset-store")))
    clean(storage=uri, shard_size=40)
    return uri


def _read(uri: str, key: str) -> pd.DataFrame:
    return to_pandas(pq.read_table(io.BytesIO(open_storage(uri).get(key))))


@pytest.fixture(scope="module")
def first_run(cleaned, tmp_path_factory):
    """Merge bmw_3-series into volkswagen_golf, ignore ford_*, and pick min_images so
    that mercedes-benz_v-class is rare."""
    from flows.dataset import dataset

    clean_df = to_pandas(read_manifest(open_storage(cleaned), manifest_key("clean")))
    _, info = assign_classes(clean_df, ClassesSettings(min_images=1))
    counts = info["counts"]
    assert set(counts) == {"volkswagen_golf", "mercedes-benz_v-class", "ford_ranger", "bmw_3-series"}
    min_images = counts["mercedes-benz_v-class"] + 1
    assert counts["volkswagen_golf"] + counts["bmw_3-series"] >= min_images
    merge = tmp_path_factory.mktemp("cfg") / "merge.yaml"
    merge.write_text("volkswagen_golf:\n  - bmw_3-series\n")
    summary = dataset(storage=cleaned, min_images=min_images, merge_map=str(merge), ignore=["ford_*"], run="run1")
    return summary, _read(cleaned, manifest_key("dataset")), counts


def test_classes_merge_ignore_rare(first_run, cleaned):
    summary, df, counts = first_run
    assert summary["classes"] == ["volkswagen_golf"]
    assert summary["class_counts"] == {"volkswagen_golf": counts["volkswagen_golf"] + counts["bmw_3-series"]}
    assert summary["rare_classes"] == {"mercedes-benz_v-class": counts["mercedes-benz_v-class"]}
    assert summary["merges_applied"] == {"bmw_3-series": "volkswagen_golf"}
    # year variants collapsed: several year labels, one class
    golf = df[df["make"] == "volkswagen"]
    assert golf["label"].nunique() >= 2 and set(golf["class_label"]) == {"volkswagen_golf"}
    assert set(df.loc[df["make"] == "ford", "reason"].dropna()) <= {"ignored_class", "duplicate", "placeholder", "truncated", "too_small", "too_large"}
    assert (df.loc[df["class_label"] == "ford_ranger", "split"].isna()).all()
    assert "ignored_class" in summary["dropped_by_reason"] and "rare_class" in summary["dropped_by_reason"]
    # classes.json is the versioned contract
    store = open_storage(cleaned)
    doc = json.loads(store.get(f"datasets/{summary['version']}/classes.json"))
    assert doc["classes"] == summary["classes"] and doc["merges"] == {"bmw_3-series": "volkswagen_golf"}
    assert json.loads(store.get("datasets/latest.json"))["version"] == summary["version"]
    assert store.exists("manifests/dataset/split_counts.png")


def test_split_has_no_leak_on_real_data(first_run):
    summary, df, _ = first_run
    report = check_leakage(df)
    assert report["total"].sum() == summary["dataset_rows"] > 20
    assert set(df["split"].dropna()) <= set(SPLITS)
    assert (df.loc[df["split"].notna(), "status"] == "kept").all()
    assert summary["split_conflicts"] == []


def test_planted_leak_fails_check_and_flow(first_run, cleaned, monkeypatch):
    _, df, _ = first_run
    leak = df.copy()
    multi = leak[leak["split"].notna()].groupby("listing_id").size()
    lid = multi[multi > 1].index[0]
    row = leak.index[(leak["listing_id"] == lid) & leak["split"].notna()][0]
    leak.loc[row, "split"] = "test" if leak.loc[row, "split"] != "test" else "train"
    with pytest.raises(LeakageError):
        check_leakage(leak)

    import flows.dataset as mod
    from tasks.split import assign_splits

    @task(name="assign-splits-leaky")
    def leaky(df, previous, config, run=""):
        out, asg, info = assign_splits(df, previous)
        rows = out.index[out["split"].notna()]
        out.loc[rows[0], "split"] = "val" if out.loc[rows[0], "split"] != "val" else "train"
        return out, asg, info

    store = open_storage(cleaned)

    def snapshot() -> dict[str, bytes]:
        keys = [*store.list("datasets/"), *store.list(manifest_key("dataset").rsplit("/", 1)[0] + "/")]
        return {k: store.get(k) for k in keys}

    from carflow.keys import pointer_key
    from carflow.registry import Registry

    before = snapshot()
    latest = Registry(store).latest("dataset")
    assert latest is not None
    assert {"datasets/assignments.parquet", manifest_key("dataset"), latest.key("classes.json"),
            pointer_key("dataset")} <= set(before)
    monkeypatch.setattr(mod, "assign_splits_task", leaky)
    # min_images=1 gives other classes than the first run: a write would show in classes.json
    with pytest.raises(LeakageError):
        mod.dataset(storage=cleaned, min_images=1, run="leaky")
    after = snapshot()
    assert set(after) == set(before)  # no new classes.json version, no new file
    for key in before:  # assignments, the dataset manifest, classes.json, latest.json
        assert after[key] == before[key], f"{key} changed although the flow failed"
    assert Registry(store).latest("dataset").version == latest.version


def test_second_run_keeps_assignments_and_exports(first_run, cleaned, s3_uri):
    from flows.dataset import dataset

    _, df1, _ = first_run
    summary = dataset(storage=cleaned, min_images=5, export_uri=s3_uri, run="run2")
    df2 = _read(cleaned, manifest_key("dataset"))
    assert len(summary["classes"]) == 4
    old = df1.dropna(subset=["split"]).set_index(["listing_id", "image_id"])["split"]
    new = df2.set_index(["listing_id", "image_id"])["split"].reindex(old.index)
    assert (new == old).all()
    check_leakage(df2)
    folders = summary["exports"]["folders"]
    rows = df2.dropna(subset=["split"])
    assert folders["written"] == len(rows) and folders["per_split"] == summary["per_split"]
    # clean input (no crop stage): the photo is the train image
    assert summary["train_images"] == "image_id" and (rows["train_image_id"] == rows["image_id"]).all()
    keys = list(open_storage(s3_uri).list())
    assert len(keys) == folders["written"]
    sample = rows.iloc[0]
    assert f"{sample['split']}/{sample['class_label']}/{sample['image_id']}.jpg" in keys


def test_clean_then_dataset_after_an_earlier_crop_never_builds_from_the_stale_crop(cleaned, tmp_path, monkeypatch):
    """The README's sequence: the model stages ran once (here: pass-throughs, as a team
    without models writes them), then clean is rerun on new data, then the dataset alone.
    The crop manifest of the earlier run is stale: one line names the stages to rerun; the
    dataset's `latest` moves only after its exports succeed."""
    import shutil

    import flows.dataset as mod
    from carflow.manifest import INGEST_SCHEMA, InputError, from_pandas, lineage_of, write_manifest
    from flows.clean import clean
    from tasks.stages import passthrough

    uri = str(tmp_path / "store")
    shutil.copytree(cleaned, uri)
    store = open_storage(uri)
    passthrough.fn(uri, "car_filter", "clean")
    passthrough.fn(uri, "crop", "car_filter")
    first = mod.dataset(storage=uri, min_images=1, run="a")
    assert first["input"].endswith("manifests/crop/manifest.parquet")  # current: used
    out = read_manifest(store, manifest_key("dataset"))
    assert lineage_of(out.schema.metadata)["input"] == "manifests/crop/manifest.parquet"
    pointer = store.get("datasets/latest.json")
    assert json.loads(pointer)["version"] == first["version"]

    # a new ingest (one listing fewer) and clean rerun: the crop manifest is now stale
    ingest = to_pandas(read_manifest(store, manifest_key("ingest")))
    ingest = ingest[ingest["listing_id"] != ingest["listing_id"].iloc[0]]
    write_manifest(store, manifest_key("ingest"), from_pandas(ingest), INGEST_SCHEMA)
    clean(storage=uri, shard_size=40)
    with pytest.raises(InputError) as err:
        mod.dataset(storage=uri, min_images=1, run="b")
    assert str(err.value) == ("manifests/crop/manifest.parquet was built from an older clean manifest: "
                              "rerun `carflow car-filter score` and `carflow crop`")
    assert store.get("datasets/latest.json") == pointer  # nothing was built

    # asked for explicitly, the current clean manifest is used; a failed export leaves
    # the `latest` dataset where it was
    @task(name="export-folders-failing")
    def failing(*_a, **_k):
        raise OSError("disk full")

    monkeypatch.setattr(mod, "export_folders_task", failing)
    with pytest.raises(OSError, match="disk full"):
        mod.dataset(storage=uri, min_images=5, ignore=["ford_*"], run="c", source="clean",
                    export_uri=str(tmp_path / "out"))
    assert store.get("datasets/latest.json") == pointer
    monkeypatch.undo()
    second = mod.dataset(storage=uri, min_images=5, ignore=["ford_*"], run="c", source="clean")
    assert second["input"].endswith("manifests/clean/manifest.parquet") and second["version"] != first["version"]
    assert json.loads(store.get("datasets/latest.json"))["version"] == second["version"]
    assert json.loads(store.get(f"datasets/{second['version']}/meta.json"))["input"] == "manifests/clean/manifest.parquet"
