"""The shard contract (tasks/shards.py): plan, key, run-or-reuse from storage, load, merge."""

from __future__ import annotations

import threading
import time

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prefect import task

from carflow.storage import LocalStorage
from tasks.shards import ShardSpec, load_shard_results, merge_results, plan_shards, run_shard


def _manifest() -> pa.Table:
    return pa.table({
        "image_id": ["c", "a", "b", "a", "d", "e"],
        "listing_id": ["l1", "l1", "l2", "l3", "l4", "l5"],
        "first_seen": pa.array([5, 9, 1, 2, 1, 0], pa.int64()),
        "status": ["kept", "kept", "kept", "kept", "kept", "dropped"],
        "reason": [None, None, None, None, None, "empty"],
    })


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 30), st.integers(0, 6), st.sampled_from(["kept", "kept", "dropped", None])),
                max_size=80), st.integers(1, 9), st.integers(0, 80))
def test_plan_of_content_ids_on_numpy_equals_the_arrow_plan(rows, size, cut):
    """Content ids (one width, no nulls) are planned on NumPy; any other id column goes
    through Arrow's group-by. Both give the same shards, also on a chunked column."""
    ids = [f"{i:064x}" for i, _, _ in rows]
    table = pa.table({"image_id": pa.array(ids, pa.string()), "first_seen": pa.array([f for _, f, _ in rows], pa.int64()),
                      "status": pa.array([s for _, _, s in rows], pa.string())})
    table = pa.concat_tables([table.slice(0, cut), table.slice(cut)])
    arrow_path = table.set_column(0, "image_id", table["image_id"].cast(pa.large_string()))
    assert plan_shards(table, size) == plan_shards(arrow_path, size)


def test_plan_orders_unique_kept_images_by_earliest_first_seen():
    table = _manifest()
    # a: earliest 2 (its second row); b and d tie at 1 → by id; e is dropped
    assert plan_shards(table, 2) == [["b", "d"], ["a", "c"]]
    assert plan_shards(table.to_pandas(), 2) == plan_shards(table, 2)
    assert plan_shards(table.filter(pa.compute.equal(table["status"], "dropped")), 2) == []
    with pytest.raises(ValueError):
        plan_shards(table, 0)


def test_the_key_covers_only_what_changes_the_output():
    spec = ShardSpec("inspect", "2", {"min_side": 64})
    assert spec.key(["b", "a"]) == spec.key(["a", "b"]) == spec.key(["a", "a", "b"])
    assert spec.key(["a", "b"]).startswith("work/inspect/inspect-2-") and spec.key(["a"]).endswith(".parquet")
    assert spec.stats_key(["a"]) == spec.key(["a"]).removesuffix(".parquet") + ".stats.json"
    assert spec.key(["a"]) != ShardSpec("inspect", "2", {"min_side": 32}).key(["a"])
    assert spec.key(["a"]) != ShardSpec("inspect", "3", {"min_side": 64}).key(["a"])
    assert spec.key(["a"]) != spec.key(["a", "b"])


def test_a_stored_shard_is_never_computed_again(tmp_path):
    spec = ShardSpec("score", "1", None)
    runs: list[list[str]] = []

    def compute(ids):
        runs.append(ids)
        return pa.table({"image_id": ids, "p": [float(len(i)) for i in ids]}), {"seen": len(ids)}

    first = LocalStorage(tmp_path / "bucket")
    out = run_shard(first, spec, ["a", "bb"], compute)
    assert out["reused"] is False and out["stats"] == {"images": 2, "seen": 2} and len(runs) == 1
    # another process (or machine) on the same storage: no compute, the stored stats
    again = run_shard(LocalStorage(tmp_path / "bucket"), spec, ["bb", "a"], compute)
    assert again == {**out, "reused": True} and len(runs) == 1
    # a parquet without its stats file is an interrupted write: computed again
    first.delete(spec.stats_key(["a", "bb"]))
    assert run_shard(first, spec, ["a", "bb"], compute)["reused"] is False and len(runs) == 2
    # another storage has no outputs: computed there
    assert run_shard(LocalStorage(tmp_path / "other"), spec, ["a", "bb"], compute)["reused"] is False

    table = load_shard_results(first, [out["key"]], columns=["image_id"])
    assert table.column_names == ["image_id"] and sorted(table["image_id"].to_pylist()) == ["a", "bb"]
    empty = load_shard_results(first, [], ["image_id", "p"], pa.schema([("image_id", pa.string()), ("p", pa.float64())]))
    assert empty.num_rows == 0 and empty.schema.field("p").type == pa.float64()


def test_merge_drops_missing_and_dropped_results_with_a_reason():
    manifest = _manifest()
    results = pa.table({
        "image_id": ["a", "b", "c", "e"],
        "status": ["kept", "dropped", "kept", "kept"],
        "reason": [None, "no_vehicle", None, None],
        "crop_id": ["A", None, "C", "E"],
    })
    out = merge_results(manifest, results, ["crop_id"], "not_cropped")
    assert out.num_rows == manifest.num_rows and out["image_id"].to_pylist() == manifest["image_id"].to_pylist()
    assert out["status"].to_pylist() == ["kept", "kept", "dropped", "kept", "dropped", "dropped"]
    assert out["reason"].to_pylist() == [None, None, "no_vehicle", None, "not_cropped", "empty"]
    # the row dropped before this stage keeps its reason and gets no result
    assert out["crop_id"].to_pylist() == ["C", "A", None, "A", None, None]
    # results without a status only add columns; only_kept=False fills every row that has one
    scores = pa.table({"image_id": ["a", "e"], "p": [0.5, 0.25]})
    every = merge_results(manifest, scores, ["p"], "not_scored", only_kept=False)
    assert every["p"].to_pylist() == [None, 0.5, None, 0.5, None, 0.25]
    assert every["reason"].to_pylist() == ["not_scored", None, "not_scored", None, "not_scored", "empty"]
    # an existing column of that name is replaced, not duplicated
    again = merge_results(out, results, ["crop_id"], "not_cropped")
    assert again.column_names.count("crop_id") == 1


def test_merge_matches_the_pandas_rule_on_random_data():
    """The Arrow merge against a plain pandas implementation of the same rule."""
    import numpy as np

    rng = np.random.default_rng(0)
    n = 500
    ids = [f"i{k}" for k in rng.integers(0, 200, n)]
    manifest = pa.table({"image_id": ids, "status": rng.choice(["kept", "dropped"], n, p=[0.8, 0.2]).tolist(),
                         "reason": [None] * n})
    res_ids = sorted({f"i{k}" for k in rng.integers(0, 200, 150)})
    results = pa.table({"image_id": res_ids, "status": rng.choice(["kept", "dropped"], len(res_ids)).tolist(),
                        "reason": ["bad"] * len(res_ids), "v": rng.random(len(res_ids))})
    merged = merge_results(manifest, results, ["v"], "missing")
    df = manifest.to_pandas().merge(results.to_pandas().rename(columns={"status": "s", "reason": "r"}),
                                    on="image_id", how="left")
    kept = df["status"] == "kept"
    want = np.where(kept & df["s"].isna(), "missing",
                    np.where(kept & (df["s"] == "dropped"), "bad", None))
    assert merged["reason"].to_pylist() == list(want)
    got_v = np.array([-1.0 if v is None else v for v in merged["v"].to_pylist()])
    assert np.allclose(got_v, df["v"].where(kept).fillna(-1).to_numpy())


def test_read_images_keeps_order_and_a_bounded_window(tmp_path):
    from tasks.shards import read_images

    class Counting(LocalStorage):
        calls = 0

        def get(self, key):
            Counting.calls += 1
            return super().get(key)

    store = Counting(tmp_path)
    ids = [store.put_image(bytes([i]) * 10) for i in range(20)]
    stream = read_images(store, [*ids[:10], "ff" * 32, *ids[10:]], workers=2, window=4)
    first = next(stream)
    assert first == (ids[0], bytes([0]) * 10) and Counting.calls <= 4  # not the whole shard at once
    rest = list(stream)
    assert [i for i, _ in rest] == [*ids[1:10], "ff" * 32, *ids[10:]] and rest[9][1] == b""


_ACTIVE = {"now": 0, "peak": 0}
_LOCK = threading.Lock()


@task
def _busy(i: int) -> int:
    with _LOCK:
        _ACTIVE["now"] += 1
        _ACTIVE["peak"] = max(_ACTIVE["peak"], _ACTIVE["now"])
    time.sleep(0.05)
    with _LOCK:
        _ACTIVE["now"] -= 1
    return i * i


@pytest.mark.integration
def test_shard_tasks_in_flight_are_bounded(prefect_server):
    """Prefect's thread runner would start every submitted shard at once (memory growing
    with the corpus); submit_bounded keeps at most `limit` running, results in order."""
    from prefect import flow

    from tasks.shards import submit_bounded

    @flow
    def stage(limit: int) -> list[int]:
        return submit_bounded(_busy, ({"i": i} for i in range(8)), limit)

    _ACTIVE["peak"] = 0
    assert stage(2) == [i * i for i in range(8)] and _ACTIVE["peak"] <= 2
    _ACTIVE["peak"] = 0
    stage(8)
    assert _ACTIVE["peak"] > 2  # unbounded, they do overlap: the bound above is real


_RELEASE = threading.Event()


@task
def _waits_for_last(i: int, last: int) -> str:
    """Call 0 blocks until the last call has run: only possible when the other slot is
    refilled while call 0 is still running."""
    if i == last:
        _RELEASE.set()
        return "last"
    if i == 0:
        return "released" if _RELEASE.wait(timeout=30) else "starved"
    return "fast"


@pytest.mark.integration
def test_a_slow_shard_does_not_hold_the_other_slots(prefect_server):
    """submit_bounded refills a slot when any run finishes, not in submission order: with
    2 slots, calls 1..5 all run while call 0 is still running (it waits for call 5)."""
    from prefect import flow

    from tasks.shards import submit_bounded

    @flow
    def stage() -> list[str]:
        return submit_bounded(_waits_for_last, ({"i": i, "last": 5} for i in range(6)), 2)

    _RELEASE.clear()
    assert stage() == ["released", "fast", "fast", "fast", "fast", "last"]


@task
def _sized(i: int) -> int:
    time.sleep(0.02)
    return i


@pytest.mark.integration
def test_a_shard_stage_publishes_its_progress_artifact(prefect_server):
    """With sizes, submit_bounded creates the stage's progress artifact once the first
    runs are going and updates it per finished run, up to 100 %."""
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from tasks.shards import submit_bounded

    @flow
    def stage() -> list[int]:
        return submit_bounded(_sized.with_options(name="sized-shard"), ({"i": i} for i in range(5)), 2,
                              sizes=[10, 10, 10, 10, 5])

    assert stage() == [0, 1, 2, 3, 4]
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["sized-shard-progress"])))
    assert found and found[0].type == "progress" and float(found[0].data) == 100.0


_SUBMITTED: list[int] = []


@task
def _fails_first(i: int) -> int:
    _SUBMITTED.append(i)
    if i == 0:
        raise RuntimeError("shard 0 failed")
    time.sleep(0.5)
    return i


@pytest.mark.integration
def test_a_failed_shard_stops_the_submissions(prefect_server):
    """A failed run raises before its slot is refilled: no shard starts after it."""
    from prefect import flow

    from tasks.shards import submit_bounded

    @flow
    def stage() -> list[int]:
        return submit_bounded(_fails_first, ({"i": i} for i in range(6)), 2)

    _SUBMITTED.clear()
    with pytest.raises(RuntimeError, match="shard 0 failed"):
        stage()
    assert sorted(_SUBMITTED) == [0, 1]


def test_a_shard_plan_makes_each_list_when_asked():
    """plan_shards holds the ids once and makes a shard's list only when it is asked for;
    it is still a sequence of lists (len, index, iteration, sizes, ==)."""
    from tasks.shards import ShardPlan, shard_sizes

    ids = [f"{i:064x}" for i in range(7)]
    table = pa.table({"image_id": ids, "first_seen": pa.array(range(7), pa.int64()), "status": ["kept"] * 7})
    plan = plan_shards(table, 3)
    assert isinstance(plan, ShardPlan) and len(plan) == 3 and plan.sizes() == [3, 3, 1] == shard_sizes(list(plan))
    assert plan[0] == ids[:3] and plan[-1] == ids[6:] and list(plan) == [ids[:3], ids[3:6], ids[6:]]
    with pytest.raises(IndexError):
        plan[3]


def test_staged_shard_rows_are_taken_lazily_as_the_column_would_be(tmp_path, monkeypatch):
    """stage_shard_results copies the shards' columns into one local file (typed by the
    schema, in row groups); TakenColumn reads a column of it at manifest rows (``at``)
    exactly as a take of the whole column would, nulls where a row has no result."""
    import pyarrow.parquet as pq

    import tasks.shards
    from tasks.shards import TakenColumn, stage_shard_results

    monkeypatch.setattr(tasks.shards, "ROW_GROUP_ROWS", 4)  # several row groups of small shards
    store = LocalStorage(tmp_path / "store")
    schema = pa.schema([("image_id", pa.string()), ("thumb", pa.binary()), ("w", pa.int64())])
    keys = []
    for s in range(5):
        rows = [{"image_id": f"{s}-{i}", "thumb": bytes([s, i]), "w": s * 10 + i} for i in range(s + 1)]
        store.put(f"work/x/{s}.parquet", _parquet(pa.Table.from_pylist(rows, schema=schema).select(["w", "image_id", "thumb"])))
        keys.append(f"work/x/{s}.parquet")
    path = stage_shard_results(store, keys, tmp_path / "r.parquet", ["image_id", "thumb"], schema, workers=2)
    staged = pq.read_table(path)
    assert staged.schema.names == ["image_id", "thumb"] and staged.num_rows == 15
    assert pq.ParquetFile(path).num_row_groups == 3  # shards of 1+2+3 | 4 | 5 rows
    assert staged["image_id"].to_pylist() == [f"{s}-{i}" for s in range(5) for i in range(s + 1)]
    at = pa.array([3, None, 14, 0, 7, 7, None, 1], pa.int32())
    rows = [7, 0, 4, 2, 6]
    assert TakenColumn(path, "thumb", at).take(rows).to_pylist() == staged["thumb"].take(at).take(
        pa.array(rows)).to_pylist()
    assert TakenColumn(path, "thumb", at).take([]).to_pylist() == []


def _parquet(table: pa.Table) -> bytes:
    import io

    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()
