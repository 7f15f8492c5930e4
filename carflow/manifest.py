"""The manifest: the contract between stages.

A manifest is a Parquet table with one row per photo occurrence: the photo ``image_id``
(sha256 of the original bytes) as it appears in listing ``listing_id``. The same photo
in two listings is two rows with the same ``image_id``; that is exactly what the
dedup and split stages need to see. ``(listing_id, image_id)`` is unique.

Each stage reads a manifest, adds its own columns and writes a new one; it never
deletes rows. A row a stage drops gets ``status='dropped'`` and a ``reason``.

Every read and write is validated: a missing column or a column of the wrong type
raises :class:`ManifestError` naming the column.
"""

from __future__ import annotations

import io
from collections.abc import Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from carflow.keys import manifest_key  # noqa: F401 - re-exported: keys have one home (carflow.keys)
from carflow.storage import Storage

KEPT = "kept"
DROPPED = "dropped"


class ManifestError(ValueError):
    """The manifest does not match its schema; the message names the column."""


#: manifest version 0, written by ingest
INGEST_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("listing_id", pa.string(), nullable=False),
        pa.field("site", pa.string(), nullable=False),
        pa.field("url", pa.string()),
        pa.field("photo_index", pa.int32()),
        pa.field("make", pa.string()),
        pa.field("model", pa.string()),
        pa.field("year", pa.int32()),
        pa.field("label", pa.string()),
        pa.field("make_raw", pa.string()),
        pa.field("model_raw", pa.string()),
        pa.field("raw_key", pa.string(), nullable=False),
        pa.field("bytes", pa.int64(), nullable=False),
        pa.field("content_type", pa.string()),
        pa.field("source", pa.string(), nullable=False),
        pa.field("crawl_id", pa.string()),
        pa.field("first_seen", pa.int64(), nullable=False),
        pa.field("status", pa.string(), nullable=False),
        pa.field("reason", pa.string()),
    ],
    metadata={"carflow.manifest": "ingest", "carflow.version": "0"},
)

#: after the clean stage (fix → quality → dedup); ``image_id`` is the kept (possibly
#: re-encoded) image, ``source_id`` the original bytes' id
CLEAN_SCHEMA = pa.schema(
    [
        *[f for f in INGEST_SCHEMA],
        pa.field("source_id", pa.string(), nullable=False),
        pa.field("width", pa.int64()),
        pa.field("height", pa.int64()),
        pa.field("fix_actions", pa.list_(pa.string())),
        pa.field("quality_flags", pa.list_(pa.string())),
        pa.field("phash", pa.int64()),
        pa.field("dhash", pa.int64()),
        pa.field("pixel_hash", pa.string()),
        pa.field("dup_cluster", pa.string()),
        pa.field("label_conflict", pa.bool_()),
    ],
    metadata={"carflow.manifest": "clean", "carflow.version": "1"},
)

#: photos that were referenced by a listing but never became an image (404, HTML, …)
REJECTS_SCHEMA = pa.schema(
    [
        pa.field("listing_id", pa.string(), nullable=False),
        pa.field("site", pa.string(), nullable=False),
        pa.field("url", pa.string(), nullable=False),
        pa.field("photo_index", pa.int32()),
        pa.field("label", pa.string()),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("crawl_id", pa.string()),
    ],
    metadata={"carflow.manifest": "ingest_rejects", "carflow.version": "0"},
)


def _compatible(actual: pa.DataType, expected: pa.DataType) -> bool:
    if actual.equals(expected):
        return True
    if pa.types.is_null(actual):  # an all-null column written by pandas
        return True
    if pa.types.is_string(expected) and (pa.types.is_large_string(actual) or pa.types.is_string_view(actual)):
        return True
    if pa.types.is_integer(expected) and pa.types.is_integer(actual):
        return True
    if pa.types.is_floating(expected) and pa.types.is_floating(actual):
        return True
    if pa.types.is_list(expected) and (pa.types.is_list(actual) or pa.types.is_large_list(actual)):
        return _compatible(actual.value_type, expected.value_type)
    if pa.types.is_dictionary(actual):
        return _compatible(actual.value_type, expected)
    return False


def validate(table: pa.Table, schema: pa.Schema, what: str = "manifest") -> None:
    """Raise :class:`ManifestError` if a column of ``schema`` is missing, mistyped or has
    nulls where it must not. Extra columns (added by later stages) are allowed."""
    names = set(table.column_names)
    for field in schema:
        if field.name not in names:
            raise ManifestError(f"{what}: missing column {field.name!r} (expected {field.type})")
        actual = table.schema.field(field.name).type
        if not _compatible(actual, field.type):
            raise ManifestError(f"{what}: column {field.name!r} has type {actual}, expected {field.type}")
        if not field.nullable and table.column(field.name).null_count:
            raise ManifestError(
                f"{what}: column {field.name!r} has {table.column(field.name).null_count} null value(s) "
                "but must not be null"
            )


def conform(table: pa.Table, schema: pa.Schema, what: str = "manifest") -> pa.Table:
    """Validate, then cast the schema's columns to their exact types (schema columns
    first, in order; extra columns kept after them)."""
    validate(table, schema, what)
    arrays, fields = [], []
    for field in schema:
        col = table.column(field.name)
        if not col.type.equals(field.type):
            try:
                col = col.cast(field.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                raise ManifestError(f"{what}: column {field.name!r} cannot be cast to {field.type}: {exc}") from exc
        arrays.append(col)
        fields.append(field)
    for name in table.column_names:
        if name not in schema.names:
            arrays.append(table.column(name))
            fields.append(table.schema.field(name))
    meta = dict(table.schema.metadata or {})
    meta.update(schema.metadata or {})
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields, metadata=meta))


def from_records(records: Iterable[dict], schema: pa.Schema, what: str = "manifest") -> pa.Table:
    rows = list(records)
    if not rows:
        return schema.empty_table()
    try:
        table = pa.Table.from_pylist(rows)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise ManifestError(f"{what}: cannot build a table: {exc}") from exc
    return conform(table, schema, what)


def to_parquet_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


def write_manifest(storage: Storage, key: str, table: pa.Table, schema: pa.Schema | None = None) -> str:
    """Validate and write ``table`` as Parquet under ``key``; returns the storage URI."""
    if schema is not None:
        table = conform(table, schema, key)
    storage.put(key, to_parquet_bytes(table), content_type="application/vnd.apache.parquet")
    return storage.uri(key)


def read_manifest(
    storage: Storage, key: str, schema: pa.Schema | None = None, columns: list[str] | None = None
) -> pa.Table:
    """Read the Parquet manifest at ``key`` and validate it against ``schema``. With
    ``columns``, only those are read (and validated): what a reduce step needs."""
    data = storage.get(key)
    try:
        table = pq.read_table(io.BytesIO(data), columns=columns)
    except pa.ArrowInvalid as exc:
        raise ManifestError(f"{storage.uri(key)}: not a Parquet manifest: {exc}") from exc
    if schema is not None:
        if columns is not None:
            schema = pa.schema([f for f in schema if f.name in columns], metadata=schema.metadata)
        table = conform(table, schema, storage.uri(key))
    return table


def from_pandas(df) -> pa.Table:
    """A DataFrame (fresh index) as an Arrow table, ready for :func:`write_manifest`."""
    return pa.Table.from_pandas(df.reset_index(drop=True), preserve_index=False)


def to_pandas(table: pa.Table):
    """``table`` as a DataFrame with nullable integer columns: a plain ``to_pandas`` turns
    an int column with nulls into float64, which loses the low bits of 64-bit hashes."""
    import pandas as pd

    mapping = {
        pa.int8(): pd.Int8Dtype(),
        pa.int16(): pd.Int16Dtype(),
        pa.int32(): pd.Int32Dtype(),
        pa.int64(): pd.Int64Dtype(),
        pa.bool_(): pd.BooleanDtype(),
    }
    return table.to_pandas(types_mapper=mapping.get)

