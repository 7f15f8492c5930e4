"""Manifest schema: round trip through both storages, clear errors for bad columns."""

from __future__ import annotations

import pyarrow as pa
import pytest

from carflow.manifest import (
    INGEST_SCHEMA,
    ManifestError,
    from_records,
    read_manifest,
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
