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

import hashlib
import io
import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from carflow.errors import UserError
from carflow.keys import manifest_key  # noqa: F401 - re-exported: keys have one home (carflow.keys)
from carflow.memory import release_freed_memory
from carflow.storage import Storage, StorageKeyError

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


#: after the car filter: the clean manifest plus ``p_car`` (null where not scored)
CAR_FILTER_SCHEMA = pa.schema(
    [*[f for f in CLEAN_SCHEMA], pa.field("p_car", pa.float32())],
    metadata={"carflow.manifest": "car_filter", "carflow.version": "1"},
)

#: after the crop stage: its input (clean, or the car filter's) plus the crop columns;
#: ``image_id`` stays the uncropped photo, ``crop_id`` is the crop's image id
CROP_MANIFEST_SCHEMA = pa.schema(
    [
        *[f for f in CLEAN_SCHEMA],
        pa.field("bbox", pa.list_(pa.int64())),
        pa.field("det_class", pa.string()),
        pa.field("det_conf", pa.float64()),
        pa.field("crop_id", pa.string()),
    ],
    metadata={"carflow.manifest": "crop", "carflow.version": "1"},
)

#: after the dataset stage: its input's columns plus class, split and the image training reads
DATASET_SCHEMA = pa.schema(
    [
        *[f for f in CLEAN_SCHEMA],
        pa.field("train_image_id", pa.string()),
        pa.field("class_label", pa.string()),
        pa.field("split", pa.string()),
        pa.field("split_group", pa.string()),
        pa.field("split_conflict", pa.bool_()),
        pa.field("classes_version", pa.string()),
    ],
    metadata={"carflow.manifest": "dataset", "carflow.version": "1"},
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


def fixed_width_values(column: pa.Array | pa.ChunkedArray, skip_nulls: bool = False) -> np.ndarray | None:
    """A string column whose values all have one length and no nulls (content ids: hex
    digests) as one NumPy ``S<width>`` array (no Python object per value: a read-only view
    of the Arrow buffer for one chunk, one copy of the bytes for several); None for any
    other column. Sorting or searching it costs a fraction of Arrow's
    hash kernels, which keep their own copy of every value in a hash table (~3× the
    column: ``bench/memory.py``). With ``skip_nulls``, a column with nulls gives the values
    of its non-null elements, in order (a null takes no bytes in Arrow's data buffer)."""
    if not pa.types.is_string(column.type):
        return None
    chunks = [c for c in (column.chunks if isinstance(column, pa.ChunkedArray) else [column]) if len(c)]
    views, width = [], None
    for c in chunks:
        if c.null_count and not skip_nulls:
            return None
        offsets = np.frombuffer(c.buffers()[1], np.int32)[c.offset : c.offset + len(c) + 1]
        lengths = np.diff(offsets)
        if c.null_count:
            valid = c.is_valid().to_numpy(zero_copy_only=False)
            if c.null_count == len(c):
                continue
            if lengths[~valid].any():  # a null slot with bytes (Arrow allows it): not this path
                return None
            lengths = lengths[valid]
        w = int(lengths[0])
        if w < 1 or (width is not None and w != width) or not (lengths == w).all():
            return None
        width = w
        views.append(np.frombuffer(c.buffers()[2], np.uint8)[offsets[0] : offsets[-1]].view(f"S{w}"))
    if not views:
        return None
    return np.concatenate(views) if len(views) > 1 else views[0]


def index_in(values: pa.Array | pa.ChunkedArray, value_set: pa.Array | pa.ChunkedArray) -> pa.Array:
    """``pc.index_in(values, value_set=value_set)``: each value's first position in
    ``value_set``, null where absent. Fixed-width strings on both sides (content ids:
    :func:`fixed_width_values`) are matched by a sort and a binary search in NumPy instead
    of a hash table holding a copy of every id."""
    keys, wanted = fixed_width_values(value_set), fixed_width_values(values)
    if keys is None or wanted is None or keys.dtype != wanted.dtype:
        out = pc.index_in(values, value_set=value_set)
        return out.combine_chunks() if isinstance(out, pa.ChunkedArray) else out
    # both are non-empty here (fixed_width_values gives None for an empty column)
    order = np.argsort(keys, kind="stable")  # equal keys keep their order: the first one wins
    keys = keys[order]
    pos = np.minimum(np.searchsorted(keys, wanted), keys.size - 1)
    hit = np.empty(wanted.size, dtype=bool)
    for start in range(0, wanted.size, 1 << 16):  # compared a block at a time: no copy of keys[pos]
        block = slice(start, start + (1 << 16))
        hit[block] = keys[pos[block]] == wanted[block]
    del keys, wanted
    return pa.array(order[pos].astype(np.int32), pa.int32(), mask=~hit)


def smallest_distinct(column: pa.Array | pa.ChunkedArray, k: int) -> list[str]:
    """The ``k`` smallest distinct non-null values of a string column, in order (a sample
    that does not depend on row order: the contact sheets)."""
    values = fixed_width_values(column)
    if values is not None:
        return [v.decode() for v in np.unique(values)[:k]]
    uniq = pc.drop_null(pc.unique(column))
    return pc.take(uniq, pc.sort_indices(uniq)[:k]).to_pylist()


def count_distinct(column: pa.Array | pa.ChunkedArray) -> int:
    """Distinct non-null values of ``column``: sorted on NumPy for a column of fixed-width
    strings (:func:`fixed_width_values`), Arrow's ``count_distinct`` otherwise."""
    values = fixed_width_values(column)
    if values is not None:
        return int(np.unique(values).size)
    return int(pc.count_distinct(column).as_py())


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


#: rows per Parquet row group of a written manifest: :func:`write_manifest` conforms (and
#: puts in order) one group at a time, so writing holds one group beside the table, never
#: a second copy of it (``bench/memory.py``)
ROW_GROUP_ROWS = 16 * 1024


class _TakenBatches:
    """``values.take(at)`` a slice at a time (:meth:`ColumnSpool.put`)."""

    def __init__(self, values: pa.Array | pa.ChunkedArray, at: pa.Array | pa.ChunkedArray):
        self.values, self.at = values, at
        self.type = values.type

    def __len__(self) -> int:
        return len(self.at)

    def slice(self, start: int, length: int) -> pa.Array | pa.ChunkedArray:
        return self.values.take(self.at.slice(start, length))


class ColumnSpool:
    """A table of ``num_rows`` rows built one column at a time on local disk, for a reduce
    whose output must never be in memory whole (``bench/orchestration.py``: the clean
    manifest of 100k images is 81 MB in Arrow). Each :meth:`put` column goes to its own
    Arrow IPC file (LZ4) in ``directory``, in batches of ``batch_rows``, and is let go;
    :meth:`slice` reads a few batches of every column back (what :func:`write_manifest`
    writes one row group from) and :meth:`column` one whole column. Columns come out in
    the order they were put, or in :attr:`names` once that is set."""

    def __init__(self, num_rows: int, directory: str | os.PathLike[str], batch_rows: int | None = None):
        self.num_rows, self.batch_rows = int(num_rows), int(batch_rows or ROW_GROUP_ROWS)
        self._dir = Path(directory)
        self._dir.mkdir(parents=True, exist_ok=True)
        self._files: dict[str, tuple[Path, pa.Field]] = {}
        self._written = 0
        self.names: list[str] = []

    def put(self, name: str, values: pa.Array | pa.ChunkedArray, at: pa.Array | pa.ChunkedArray | None = None) -> None:
        """Spool column ``name`` (replacing one of that name), ``num_rows`` long; with
        ``at``, ``values.take(at)``, taken a batch at a time (never whole)."""
        if at is not None:
            values = _TakenBatches(values, at)
        if len(values) != self.num_rows:
            raise ValueError(f"column {name!r} has {len(values)} rows, the spool {self.num_rows}")
        self._written += 1
        path = self._dir / f"{self._written}.arrow"
        field = pa.field(name, values.type)
        options = pa.ipc.IpcWriteOptions(compression="lz4")
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, pa.schema([field]), options=options) as w:
            for start in range(0, self.num_rows, self.batch_rows):
                part = values.slice(start, self.batch_rows)
                if isinstance(part, pa.ChunkedArray):
                    part = part.combine_chunks()
                w.write_batch(pa.record_batch([part], schema=pa.schema([field])))
        old = self._files.get(name)
        if old is not None:
            old[0].unlink(missing_ok=True)
        else:
            self.names.append(name)
        self._files[name] = (path, field)

    def __contains__(self, name: str) -> bool:
        return name in self._files

    @property
    def column_names(self) -> list[str]:
        return list(self.names)

    @property
    def schema(self) -> pa.Schema:
        return pa.schema([self._files[n][1] for n in self.names])

    def _batches(self, name: str, first: int, last: int) -> list[pa.Array]:
        with pa.OSFile(str(self._files[name][0]), "rb") as source:
            reader = pa.ipc.open_file(source)
            return [reader.get_batch(i).column(0) for i in range(first, last)]

    def column(self, name: str) -> pa.ChunkedArray:
        """One whole column, read back."""
        chunks = self._batches(name, 0, -(-self.num_rows // self.batch_rows))
        return pa.chunked_array(chunks, type=self._files[name][1].type)

    __getitem__ = column

    def slice(self, start: int = 0, length: int | None = None) -> pa.Table:
        """Rows ``[start, start + length)`` of every column (only their batches are read)."""
        start = min(max(int(start), 0), self.num_rows)
        stop = self.num_rows if length is None else min(self.num_rows, start + int(length))
        first, last = start // self.batch_rows, -(-stop // self.batch_rows)
        arrays = []
        for name in self.names:
            chunks = self._batches(name, first, last) if stop > start else []
            col = pa.chunked_array(chunks, type=self._files[name][1].type)
            arrays.append(col.slice(start - first * self.batch_rows, stop - start))
        return pa.Table.from_arrays(arrays, schema=self.schema)


def write_manifest(storage: Storage, key: str, table: pa.Table | ColumnSpool, schema: pa.Schema | None = None,
                   lineage: Mapping[str, Any] | None = None, *, order: Any = None) -> str:
    """Validate and write ``table`` (an Arrow table, or a :class:`ColumnSpool` read back
    one row group at a time) as Parquet under ``key``; returns the storage URI.
    ``lineage`` (:meth:`StageInput.lineage`: the input manifest's key and content hash)
    goes into the Parquet metadata under ``carflow.lineage``. ``order`` (row indices, e.g.
    ``pc.sort_indices``) writes the rows in that order without a sorted copy of the
    table. Written in row groups of :data:`ROW_GROUP_ROWS`, each conformed on its own."""
    if schema is not None and isinstance(table, pa.Table):  # a spool: each group is checked as written
        validate(table, schema, key)
    out = conform(table.slice(0, 0), schema, key) if schema is not None else table.slice(0, 0)
    meta = dict(out.schema.metadata or {})
    if lineage is not None:
        meta[LINEAGE_META] = json.dumps({"stage": stage_of(key), **lineage}, sort_keys=True).encode()
    out_schema = out.schema.with_metadata(meta)
    # written to a temporary file, then stored from it: the Parquet bytes are never
    # gathered in memory beside the table (a BytesIO and its getvalue() copy were)
    with tempfile.TemporaryFile(prefix="carflow-manifest-") as sink:
        with pq.ParquetWriter(sink, out_schema, compression="zstd") as writer:
            for start in range(0, max(table.num_rows, 1), ROW_GROUP_ROWS):
                group = (table.slice(start, ROW_GROUP_ROWS) if order is None
                         else table.take(order[start : start + ROW_GROUP_ROWS]))
                if schema is not None:
                    group = conform(group, schema, key)
                writer.write_table(group.replace_schema_metadata(meta))
                del group
        sink.seek(0)
        storage.put_file(key, sink, content_type="application/vnd.apache.parquet")
    release_freed_memory()  # the writer's page buffers, freed in small pieces
    return storage.uri(key)


#: the command that writes each stage's manifest (named in a missing-input error)
STAGE_COMMANDS = {
    "ingest": "carflow ingest",
    "clean": "carflow clean",
    "car_filter": "carflow car-filter score",
    "crop": "carflow crop",
    "dataset": "carflow dataset",
}


class ManifestMissing(UserError, StorageKeyError):
    """An input manifest no stage has written yet (a user's mistake: run the stage).
    Still a ``KeyError`` for code that asks whether a manifest exists."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


def _missing(storage: Storage, key: str) -> ManifestMissing:
    parts = key.split("/")
    stage = parts[-2] if len(parts) >= 2 else ""
    command = STAGE_COMMANDS.get(stage)
    how = f"run `{command}` first" if command else "run the stage that writes it first"
    return ManifestMissing(f"{key} does not exist in {storage.uri()}: {how}")


def read_manifest(storage: Storage, key: str, schema: pa.Schema | None = None,
                  columns: list[str] | None = None) -> pa.Table:
    """Read the Parquet manifest at ``key`` and validate it against ``schema``. A missing
    manifest raises :class:`ManifestMissing` (one line naming the command that writes it).
    With ``columns``, only those of them that the manifest has are read."""
    try:
        data = storage.get(key)
    except StorageKeyError:
        raise _missing(storage, key) from None
    try:
        if columns is not None:
            present = set(pq.read_schema(io.BytesIO(data)).names)
            columns = [c for c in columns if c in present]
        table = pq.read_table(io.BytesIO(data), columns=columns)
    except pa.ArrowInvalid as exc:
        raise ManifestError(f"{storage.uri(key)}: not a Parquet manifest: {exc}") from exc
    if schema is not None:
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


# ---------------------------------------------------------------- stage inputs and lineage
#: the stages that write a manifest, in DAG order
STAGES = ("ingest", "clean", "car_filter", "crop", "dataset")
#: the schema each stage's manifest is checked against when it is written
STAGE_SCHEMAS = {
    "ingest": INGEST_SCHEMA,
    "clean": CLEAN_SCHEMA,
    "car_filter": CAR_FILTER_SCHEMA,
    "crop": CROP_MANIFEST_SCHEMA,
    "dataset": DATASET_SCHEMA,
}
LINEAGE_META = b"carflow.lineage"


class InputError(UserError, ManifestError):
    """A stage's input manifest is missing or stale; the message is one line naming the
    manifest and the command(s) to run."""


def stage_of(key: str) -> str:
    """``manifests/<stage>/manifest.parquet`` → ``<stage>``."""
    parts = key.rstrip("/").split("/")
    return parts[-2] if len(parts) >= 2 else key


def content_hash(data: bytes) -> str:
    """The content hash a manifest's lineage records for its input: sha256 of the bytes."""
    return hashlib.sha256(data).hexdigest()


def lineage_of(metadata: Mapping[bytes, bytes] | None) -> dict[str, Any] | None:
    """The ``carflow.lineage`` record of a manifest's metadata (``{"stage", "input",
    "input_hash"}``), or None (manifest v0, or written before lineage existed)."""
    raw = (metadata or {}).get(LINEAGE_META)
    return json.loads(raw) if raw else None


def _commands(stages: Iterable[str]) -> str:
    cmds = [f"`{STAGE_COMMANDS.get(s, s)}`" for s in stages]
    return cmds[0] if len(cmds) == 1 else ", ".join(cmds[:-1]) + f" and {cmds[-1]}"


def input_key(storage: Storage, stage: str, source: str | None = None, prefix: str = "manifests") -> str:
    """The manifest ``stage`` reads. ``source`` (a stage name or a manifest key) must
    exist. Without it: the previous stage's manifest in DAG order (:data:`STAGES`), or,
    when a model stage has never run here, the nearest earlier one that exists (the
    dataset reads crop, else car_filter, else clean). Whichever it is must be current
    (:func:`read_input` checks). Raises :class:`InputError` naming the command to run."""
    if source:
        key = source if source.endswith(".parquet") else manifest_key(source, prefix=prefix)
        if not storage.exists(key):
            raise InputError(f"{stage} input {storage.uri(key)} does not exist: run "
                             f"{_commands([stage_of(key)])} first")
        return key
    earlier = list(STAGES[: STAGES.index(stage)]) if stage in STAGES else []
    for name in reversed(earlier):
        key = manifest_key(name, prefix=prefix)
        if storage.exists(key):
            return key
        if name == "clean":  # never fall back past clean
            break
    want = earlier[-1] if earlier else "ingest"
    need = "clean" if "clean" in earlier else want
    raise InputError(f"{stage} has no input: {storage.uri(manifest_key(need, prefix=prefix))} does not exist: run "
                     f"{_commands([need])} first")


@dataclass(frozen=True)
class InputRef:
    """A stage's input manifest by key and content hash (what its output's lineage names)."""

    key: str
    hash: str

    def lineage(self) -> dict[str, str]:
        """What the stage's own manifest records: this input's key and content hash."""
        return {"input": self.key, "input_hash": self.hash}


@dataclass(frozen=True)
class StageInput(InputRef):
    """A stage's input manifest, read and checked current."""

    table: pa.Table


def check_current(storage: Storage, key: str, metadata: Mapping[bytes, bytes] | None) -> None:
    """Walk the lineage of the manifest at ``key`` upstream: each manifest's recorded input
    must still exist with the recorded content hash. A stale link raises
    :class:`InputError`, one line naming the stages to rerun, in order."""
    chain = [stage_of(key)]
    lineage = lineage_of(metadata)
    while lineage:
        src = lineage["input"]
        try:
            data = storage.get(src)
        except KeyError:
            raise InputError(f"{key} was built from {src}, which no longer exists: rerun "
                             f"{_commands(reversed([*chain, stage_of(src)]))}") from None
        if content_hash(data) != lineage.get("input_hash"):
            raise InputError(f"{key} was built from an older {stage_of(src)} manifest: rerun "
                             f"{_commands(reversed(chain))}")
        chain.append(stage_of(src))
        lineage = lineage_of(pq.ParquetFile(io.BytesIO(data)).schema_arrow.metadata)


def read_input(storage: Storage, key: str, schema: pa.Schema | None = None, check: bool = True,
               columns: list[str] | None = None) -> StageInput:
    """Read a stage's input manifest, validate it against ``schema`` and check that it is
    current (:func:`check_current`). A missing manifest raises :class:`InputError`. With
    ``columns``, only those are read (and validated): what a plan or reduce step needs."""
    try:
        data = storage.get(key)
    except KeyError:
        raise InputError(f"{storage.uri(key)} does not exist: run {_commands([stage_of(key)])} first") from None
    try:  # a BufferReader: column chunks are read as slices of ``data``, not copied
        table = pq.read_table(pa.BufferReader(data), columns=columns)
    except pa.ArrowInvalid as exc:
        raise ManifestError(f"{storage.uri(key)}: not a Parquet manifest: {exc}") from exc
    if check:
        check_current(storage, key, pq.ParquetFile(pa.BufferReader(data)).schema_arrow.metadata)
    if schema is not None:
        if columns is not None:
            schema = pa.schema([f for f in schema if f.name in columns], metadata=schema.metadata)
        table = conform(table, schema, storage.uri(key))
    return StageInput(key, content_hash(data), table)


def read_column(path: str | os.PathLike[str], name: str) -> pa.ChunkedArray:
    """One column of a local Parquet file, decoded one page at a time: no thread pool
    and no pre-buffered column chunks (a 100k-row string column of 6 MB took 19 MB of
    RSS to read with both, 11 MB without)."""
    return pq.read_table(path, columns=[name], use_threads=False, pre_buffer=False).column(0)


@dataclass(frozen=True)
class LocalInput(InputRef):
    """A stage's input manifest copied into a local file (:func:`stage_input`): a reduce
    reads it a column at a time, never whole."""

    path: Path
    schema: pa.Schema | None
    num_rows: int

    @property
    def column_names(self) -> list[str]:
        return pq.ParquetFile(self.path).schema_arrow.names

    def column(self, name: str) -> pa.ChunkedArray:
        """Column ``name``, cast to its type in ``schema`` (as :func:`read_input` conforms)."""
        col = read_column(self.path, name)
        want = self.schema.field(name).type if self.schema is not None and name in self.schema.names else None
        if want is not None and not col.type.equals(want):
            try:
                col = col.cast(want)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                raise ManifestError(f"{self.key}: column {name!r} cannot be cast to {want}: {exc}") from exc
        return col

    __getitem__ = column


def stage_input(storage: Storage, key: str, directory: str | os.PathLike[str],
                schema: pa.Schema | None = None) -> LocalInput:
    """Copy a stage's input manifest into ``directory`` (streamed: :meth:`Storage.get_file`)
    and check its columns' names and types against ``schema``, and the non-null ones
    wherever the file's statistics count nulls; its content hash is the same as
    :func:`read_input`'s. Errors as :func:`read_input`'s."""
    path = Path(directory) / "input.parquet"
    digest = hashlib.sha256()
    try:
        with open(path, "wb") as fh:
            storage.get_file(key, fh)
    except KeyError:
        raise InputError(f"{storage.uri(key)} does not exist: run {_commands([stage_of(key)])} first") from None
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    try:
        pf = pq.ParquetFile(path)
    except pa.ArrowInvalid as exc:
        raise ManifestError(f"{storage.uri(key)}: not a Parquet manifest: {exc}") from exc
    if schema is not None:
        conform(pf.schema_arrow.empty_table(), schema, storage.uri(key))
        meta = pf.metadata
        leaf = {meta.schema.column(j).path: j for j in range(meta.num_columns)}  # flat columns by name
        for field in schema:
            if field.nullable or field.name not in leaf:
                continue
            nulls = 0
            for g in range(meta.num_row_groups):
                stats = meta.row_group(g).column(leaf[field.name]).statistics
                nulls += stats.null_count if stats is not None and stats.has_null_count else 0
            if nulls:
                raise ManifestError(f"{storage.uri(key)}: column {field.name!r} has {nulls} null value(s) "
                                    "but must not be null")
    return LocalInput(key, digest.hexdigest(), path, schema, pf.metadata.num_rows)
