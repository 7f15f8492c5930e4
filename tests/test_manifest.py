"""Manifest schema: round trip through both storages, clear errors for bad columns."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from carflow.manifest import (
    INGEST_SCHEMA,
    ManifestError,
    count_distinct,
    from_records,
    index_in,
    read_manifest,
    smallest_distinct,
    write_manifest,
)


def _row(i: int, **kw) -> dict:
    row = {
        "image_id": f"{i:064x}",
        "listing_id": f"demo:{i // 3}",
        "site": "demo",
        "url": f"http://x/{i}.jpg",
        "photo_index": i % 3,
        "make": "volkswagen",
        "model": "golf",
        "year": 2017,
        "label": "volkswagen_golf_2017",
        "make_raw": "VW",
        "model_raw": "Golf",
        "raw_key": f"raw/00/{i:064x}",
        "bytes": 1000 + i,
        "content_type": "image/jpeg",
        "source": "crawl",
        "crawl_id": "c1",
        "first_seen": i,
        "status": "kept",
        "reason": None,
    }
    row.update(kw)
    return row


def test_round_trip_both_backends(storage):
    table = from_records([_row(i) for i in range(10)], INGEST_SCHEMA)
    uri = write_manifest(storage, "manifests/ingest/manifest.parquet", table, INGEST_SCHEMA)
    assert uri.endswith("manifests/ingest/manifest.parquet")
    back = read_manifest(storage, "manifests/ingest/manifest.parquet", INGEST_SCHEMA)
    assert back.equals(table)
    assert back.schema.field("year").type == pa.int32()


def test_extra_columns_survive(storage):
    table = from_records([_row(i) for i in range(3)], INGEST_SCHEMA)
    table = table.append_column("p_car", pa.array([0.1, 0.9, 0.5]))
    write_manifest(storage, "m.parquet", table, INGEST_SCHEMA)
    assert read_manifest(storage, "m.parquet", INGEST_SCHEMA).column("p_car").to_pylist() == [0.1, 0.9, 0.5]


def test_missing_column_is_named(tmp_path):
    table = from_records([_row(1)], INGEST_SCHEMA).drop_columns(["listing_id"])
    with pytest.raises(ManifestError, match="missing column 'listing_id'"):
        write_manifest(None, "m.parquet", table, INGEST_SCHEMA)  # fails before touching storage


def test_wrong_type_is_named():
    table = from_records([_row(1)], INGEST_SCHEMA)
    idx = table.column_names.index("bytes")
    table = table.set_column(idx, "bytes", pa.array(["big"]))
    with pytest.raises(ManifestError, match="column 'bytes' has type string"):
        from_records(table.to_pylist(), INGEST_SCHEMA)


def test_null_in_required_column_is_named():
    with pytest.raises(ManifestError, match="'image_id'.*null"):
        from_records([_row(1, image_id=None)], INGEST_SCHEMA)


def test_not_parquet_is_a_clear_error(storage):
    storage.put("m.parquet", b"definitely not parquet")
    with pytest.raises(ManifestError, match="not a Parquet manifest"):
        read_manifest(storage, "m.parquet", INGEST_SCHEMA)


# ---------------------------------------------------------------- lineage and stage schemas


def _stage(store, stage: str, rows: list[dict], source: str | None = None, schema=INGEST_SCHEMA) -> str:
    """Write ``manifests/<stage>/manifest.parquet`` as a stage does: read its input (checked
    current), record its lineage."""
    from carflow.manifest import manifest_key, read_input

    lineage = read_input(store, manifest_key(source)).lineage() if source else None
    write_manifest(store, manifest_key(stage), from_records(rows, schema), schema, lineage=lineage)
    return manifest_key(stage)


def test_lineage_records_the_input_and_a_stale_chain_names_the_stages_to_rerun(tmp_path):
    from carflow.manifest import InputError, content_hash, lineage_of, manifest_key, read_input
    from carflow.storage import LocalStorage

    store = LocalStorage(tmp_path)
    rows = [_row(i) for i in range(4)]
    _stage(store, "ingest", rows)
    _stage(store, "clean", rows, "ingest")
    _stage(store, "car_filter", rows, "clean")
    _stage(store, "crop", rows, "car_filter")
    crop = read_input(store, manifest_key("crop"))  # a current chain reads fine
    lin = lineage_of(crop.table.schema.metadata)
    assert lin == {"stage": "crop", "input": "manifests/car_filter/manifest.parquet",
                   "input_hash": content_hash(store.get("manifests/car_filter/manifest.parquet"))}
    assert crop.hash == content_hash(store.get("manifests/crop/manifest.parquet"))

    # clean is rerun on new data; the crop manifest of the earlier run is now stale
    _stage(store, "clean", [*rows, _row(9)], "ingest")
    with pytest.raises(InputError) as err:
        read_input(store, manifest_key("crop"))
    assert str(err.value) == ("manifests/crop/manifest.parquet was built from an older clean manifest: "
                              "rerun `carflow car-filter score` and `carflow crop`")
    assert "\n" not in str(err.value)
    read_input(store, manifest_key("clean"))  # clean itself is current
    read_input(store, manifest_key("crop"), check=False)  # the check can be skipped explicitly
    _stage(store, "car_filter", [*rows, _row(9)], "clean")
    with pytest.raises(InputError, match=r"older car_filter manifest: rerun `carflow crop`$"):
        read_input(store, manifest_key("crop"))
    store.delete(manifest_key("car_filter"))
    with pytest.raises(InputError, match=r"no longer exists: rerun `carflow car-filter score` and `carflow crop`"):
        read_input(store, manifest_key("crop"))
    with pytest.raises(InputError, match=r"car_filter/manifest.parquet does not exist: run `carflow car-filter score`"):
        read_input(store, manifest_key("car_filter"))


def test_stage_schemas_are_checked_on_write(tmp_path):
    from carflow.manifest import (
        CAR_FILTER_SCHEMA,
        CLEAN_SCHEMA,
        CROP_MANIFEST_SCHEMA,
        DATASET_SCHEMA,
    )
    from carflow.storage import LocalStorage

    store = LocalStorage(tmp_path)
    clean = {**_row(1), "source_id": "s", "width": 4, "height": 3, "fix_actions": [], "quality_flags": [],
             "phash": 1, "dhash": 2, "pixel_hash": None, "dup_cluster": "c", "label_conflict": False}
    table = from_records([clean], CLEAN_SCHEMA)
    for schema, column in ((CAR_FILTER_SCHEMA, "p_car"), (CROP_MANIFEST_SCHEMA, "bbox"),
                           (DATASET_SCHEMA, "train_image_id")):
        with pytest.raises(ManifestError, match=column):
            write_manifest(store, "m.parquet", table, schema)
    scored = table.append_column("p_car", pa.array([0.9], pa.float64()))
    write_manifest(store, "m.parquet", scored, CAR_FILTER_SCHEMA)
    assert read_manifest(store, "m.parquet").schema.field("p_car").type == pa.float32()  # conformed
    with pytest.raises(ManifestError, match="p_car"):
        write_manifest(store, "m.parquet", table.append_column("p_car", pa.array(["x"])), CAR_FILTER_SCHEMA)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.one_of(st.none(), st.sampled_from(["ab", "cd", "ef", "abc", "", "é1"])), max_size=8),
                max_size=4), st.integers(0, 3))
def test_count_distinct_agrees_with_arrow(chunks, cut):
    """The NumPy path (one width, no nulls) and the fallback count as Arrow does, on
    chunked and sliced columns."""
    col = pa.chunked_array([pa.array(c, pa.string()) for c in chunks], pa.string())
    assert count_distinct(col) == pc.count_distinct(col).as_py()
    flat = col.combine_chunks()
    part = flat.slice(min(cut, len(flat)))
    assert count_distinct(part) == pc.count_distinct(part).as_py()
    distinct = sorted({v for v in part.to_pylist() if v is not None})
    assert smallest_distinct(part, 2) == distinct[:2] and smallest_distinct(col, 99) == sorted(
        {v for v in col.to_pylist() if v is not None})
    # index_in: each value's first position in the set, null where absent (as Arrow's kernel)
    expected = pc.index_in(col, value_set=part)
    expected = expected.combine_chunks() if isinstance(expected, pa.ChunkedArray) else expected
    assert index_in(col, part).to_pylist() == expected.to_pylist()


def test_count_distinct_of_content_ids():
    ids = [f"{i % 700:064x}" for i in range(1000)]
    col = pa.chunked_array([pa.array(ids[:300]), pa.array(ids[300:])])
    assert count_distinct(col) == 700 and count_distinct(col.combine_chunks().slice(999)) == 1


@settings(max_examples=150, deadline=None)
@given(st.lists(st.lists(st.one_of(st.none(), st.sampled_from(["ab", "cd", "ef"])), max_size=6), max_size=4))
def test_fixed_width_values_can_skip_nulls(chunks):
    """With ``skip_nulls``, the non-null values of a one-width column, in order."""
    from carflow.manifest import fixed_width_values

    col = pa.chunked_array([pa.array(c, pa.string()) for c in chunks], pa.string())
    values = [v for v in col.to_pylist() if v is not None]
    got = fixed_width_values(col, skip_nulls=True)
    assert (got is None and not values) or [v.decode() for v in got] == values
    if col.null_count:
        assert fixed_width_values(col) is None


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 70), st.integers(1, 16), st.integers(0, 80), st.integers(0, 30))
def test_column_spool_reads_back_what_was_put(n, batch, start, length):
    """A spooled column, or a column taken at indices (``at``), reads back whole and by
    slice as it was put; columns come out in put order or in ``names``; a column put again
    replaces the first; a spool writes the same manifest as the table."""
    import tempfile

    from carflow.manifest import ColumnSpool
    from carflow.storage import LocalStorage

    table = pa.table({"image_id": [f"{i:04d}" for i in range(n)], "n": pa.array(range(n), pa.int64()),
                      "tags": [[str(i)] * (i % 3) for i in range(n)]})
    at = pa.array([(7 * i) % n if i % 5 else None for i in range(n)], pa.int64()) if n else pa.array([], pa.int64())
    with tempfile.TemporaryDirectory() as tmp:
        spool = ColumnSpool(n, tmp, batch_rows=batch)
        spool.put("n", pa.array([0] * n, pa.int64()))
        spool.put("tags", table["tags"])
        spool.put("image_id", table["image_id"])
        spool.put("n", table["n"])  # replaces
        spool.put("taken", table["n"], at=at)
        assert spool.column_names == ["n", "tags", "image_id", "taken"]
        assert spool["taken"].to_pylist() == table["n"].take(at).to_pylist()
        spool.names = ["image_id", "n", "tags"]
        assert spool.slice(0).equals(table)
        assert spool.slice(start, length).equals(table.slice(start, length))
        with pytest.raises(ValueError, match="rows"):
            spool.put("short", pa.array([1] * (n + 1)))
        store = LocalStorage(tmp)
        write_manifest(store, "a.parquet", spool)
        write_manifest(store, "b.parquet", table)
        assert read_manifest(store, "a.parquet").equals(read_manifest(store, "b.parquet"))


def test_stage_input_is_read_input_from_a_local_copy(tmp_path):
    """The reduce's input: copied into a local file with the same content hash as
    :func:`read_input`, its columns conformed to the schema one at a time; a missing
    input, a file that is not Parquet and a null in a required column are the same
    one-line errors."""
    from carflow.manifest import InputError, read_input, stage_input
    from carflow.storage import LocalStorage

    store = LocalStorage(tmp_path / "store")
    table = from_records([_row(i) for i in range(5)], INGEST_SCHEMA)
    narrowed = table.set_column(table.schema.get_field_index("photo_index"), "photo_index",
                                table["photo_index"].cast(pa.int64()))  # written wider than the schema
    write_manifest(store, "manifests/ingest/manifest.parquet", narrowed)
    local = stage_input(store, "manifests/ingest/manifest.parquet", tmp_path, INGEST_SCHEMA)
    whole = read_input(store, "manifests/ingest/manifest.parquet", INGEST_SCHEMA, check=False)
    assert local.hash == whole.hash and local.lineage() == whole.lineage() and local.num_rows == 5
    assert local["photo_index"].type == pa.int32() and local["image_id"].equals(whole.table["image_id"])
    with pytest.raises(InputError, match="carflow clean"):
        stage_input(store, "manifests/clean/manifest.parquet", tmp_path)
    store.put("manifests/ingest/manifest.parquet", b"not parquet")
    with pytest.raises(ManifestError, match="not a Parquet manifest"):
        stage_input(store, "manifests/ingest/manifest.parquet", tmp_path)
    import pyarrow.parquet as pq

    nulls = table.set_column(0, "image_id", pa.array([None] * 5, pa.string()))
    pq.write_table(nulls, tmp_path / "nulls.parquet")
    store.put("manifests/ingest/manifest.parquet", (tmp_path / "nulls.parquet").read_bytes())
    with pytest.raises(ManifestError, match="'image_id' has 5 null"):
        stage_input(store, "manifests/ingest/manifest.parquet", tmp_path, INGEST_SCHEMA)
