"""The shard contract, one home for every per-image stage (clean's inspect pass, the car
filter's scoring, the crop), and the ``gpu`` concurrency slot the model stages hold
(:func:`gpu_slot`).

1. **Plan** (:func:`plan_shards`): unique kept images ordered by when they were first
   seen (then id), cut into fixed-size shards. New listings append images at the end,
   so only the tail shard and the new shards get new keys.
2. **Key** (:class:`ShardSpec`): :func:`carflow.caching.content_key` over the stage
   name and code version, the model version, the sorted image ids and only the settings
   that change the shard's per-image output. Thresholds applied later (quality checks,
   the car filter's threshold) are not part of it: the reduce step applies them.
3. **Run or reuse** (:func:`run_shard`): the output is
   ``work/<stage>/<content key>.parquet`` plus ``<content key>.stats.json``
   (:func:`carflow.keys.shard_key` / :func:`carflow.keys.shard_stats_key`), the stats
   file written last. A shard whose two files exist in the storage is never computed
   again, whatever Prefect's local cache holds: a new worker container, or a second
   machine on the same bucket, reuses it; a stage's ``refresh`` parameter recomputes and
   overwrites it. Shard tasks take no Prefect cache
   (``cache_policy=NO_CACHE``): the storage is the cache. A shard with a missing input
   (stats ``incomplete``) is written under ``<content key>.partial.parquet`` and never
   counts as done: a transient miss is retried by the next run, not kept forever.
4. **Submit** (:func:`run_shards`): one Prefect task per shard, at most
   ``runtime.max_workers`` in flight (:func:`submit_bounded`); returns the small result
   dicts and the shards that really ran. Inside a shard, :func:`read_images` streams the
   bytes with a bounded number of reads in flight.
5. **Load** (:func:`load_shard_results`): only the needed columns, as one Arrow table;
   or (:func:`stage_shard_results`) copied into one local Parquet file, for a reduce that
   reads a column at a time (:class:`TakenColumn`: only the rows it asks for).
6. **Merge** (:func:`merge_results`): per-image results onto the manifest rows, in Arrow,
   with the one rule for rows without a result: dropped, with the stage's reason.
"""

from __future__ import annotations

import io
import json
import logging
import re
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from carflow.caching import content_key
from carflow.keys import shard_key, shard_partial_key, shard_stats_key
from carflow.manifest import (
    DROPPED,
    KEPT,
    ROW_GROUP_ROWS,
    InputRef,
    fixed_width_values,
    index_in,
    read_input,
)
from carflow.memory import release_freed_memory
from carflow.storage import Storage

log = logging.getLogger(__name__)

#: what a shard's ``compute`` returns: its per-image rows and its counters
ShardOutput = tuple[pa.Table, dict[str, Any]]


# ---------------------------------------------------------------------------------------
# plan
# ---------------------------------------------------------------------------------------
PLAN_COLUMNS = ["image_id", "first_seen", "status"]


class ShardPlan(Sequence):
    """The shards of a plan, each a list of image ids. The ids are held once, in plan
    order (content ids as one NumPy ``S<width>`` array: 64 bytes each, where a list of
    Python strings took 113); a shard's list is made only when it is asked for, so a
    stage holds the lists of the shards in flight, never 100k strings at once
    (``bench/orchestration.py``)."""

    def __init__(self, ids: np.ndarray | Sequence[str], shard_size: int):
        self._ids, self.shard_size = ids, int(shard_size)

    def __len__(self) -> int:
        return -(-len(self._ids) // self.shard_size)

    def __getitem__(self, i: int) -> list[str]:  # type: ignore[override]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        part = self._ids[i * self.shard_size : (i + 1) * self.shard_size]
        return [x.decode() for x in part] if isinstance(part, np.ndarray) else list(part)

    def sizes(self) -> list[int]:
        """Images per shard."""
        n = len(self._ids)
        return [min(self.shard_size, n - start) for start in range(0, n, self.shard_size)]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and list(self) == list(other)

    def __repr__(self) -> str:
        return f"ShardPlan({len(self._ids)} images, {len(self)} shards of {self.shard_size})"


def shard_sizes(shards: Sequence[Sequence[str]]) -> list[int]:
    """Images per shard of a plan (:class:`ShardPlan` without making its lists)."""
    return shards.sizes() if isinstance(shards, ShardPlan) else [len(ids) for ids in shards]


def plan_shards(manifest: Any, shard_size: int) -> ShardPlan:
    """Unique kept image ids of ``manifest`` (an Arrow table or a DataFrame with
    ``image_id``, ``first_seen``, ``status``), ordered by their earliest ``first_seen``
    (then id), in shards of ``shard_size`` (a :class:`ShardPlan`: a sequence of lists)."""
    if shard_size < 1:
        raise ValueError("shard size must be >= 1")
    if isinstance(manifest, pa.Table):
        table = manifest.select(PLAN_COLUMNS)
    else:
        table = pa.Table.from_pandas(manifest[PLAN_COLUMNS], preserve_index=False)
    kept = table.filter(pc.fill_null(pc.equal(table["status"], KEPT), False))
    if kept.num_rows == 0:
        return ShardPlan([], shard_size)
    ids = fixed_width_values(kept["image_id"])
    if ids is not None and kept["first_seen"].null_count == 0:
        # content ids (one width, no nulls): sorted in NumPy, no Arrow hash table of the
        # ids and no Python string per image until the shards are cut (bench/memory.py)
        first_seen = kept["first_seen"].to_numpy()
        del kept, table
        by_id = np.lexsort((first_seen, ids))  # each id's earliest first_seen comes first
        ids, first_seen = ids[by_id], first_seen[by_id]
        del by_id
        lead = np.ones(ids.size, dtype=bool)
        lead[1:] = ids[1:] != ids[:-1]
        ids, first_seen = ids[lead], first_seen[lead]
        return ShardPlan(ids[np.lexsort((ids, first_seen))], shard_size)
    order = kept.group_by("image_id").aggregate([("first_seen", "min")])
    order = order.sort_by([("first_seen_min", "ascending"), ("image_id", "ascending")])
    return ShardPlan(order["image_id"].to_pylist(), shard_size)


@dataclass(frozen=True)
class PlannedInput(InputRef):
    """A stage's input manifest (key and content hash, for its reduce and lineage) and the
    shards planned from it (:func:`plan_input`)."""

    shards: ShardPlan


def plan_input(storage: Storage, key: str, schema: pa.Schema, shard_size: int) -> PlannedInput:
    """Read only the plan's columns of a stage's input manifest (checked current:
    :func:`carflow.manifest.read_input`), plan its shards, and let the rows go: the flow
    holds the plan's ids while its shards run, nothing else per image."""
    source = read_input(storage, key, schema, columns=PLAN_COLUMNS)
    planned = PlannedInput(source.key, source.hash, plan_shards(source.table, shard_size))
    del source
    release_freed_memory()  # the rows and the sort's work arrays, before the shards run
    return planned


# ---------------------------------------------------------------------------------------
# key, run or reuse, write
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShardSpec:
    """What names one stage's shard outputs. ``version`` is the code version, with the
    model version appended for model stages; ``config`` holds only the settings that
    change per-image results (never paths, clients, batch sizes or later thresholds)."""

    stage: str
    version: str
    config: Any = None

    def content_key(self, image_ids: Sequence[str]) -> str:
        return content_key(self.stage, self.version, image_ids, self.config)

    def key(self, image_ids: Sequence[str]) -> str:
        """``work/<stage>/<content key>.parquet``"""
        return shard_key(self.stage, self.content_key(image_ids))

    def stats_key(self, image_ids: Sequence[str]) -> str:
        """``work/<stage>/<content key>.stats.json``"""
        return shard_stats_key(self.stage, self.content_key(image_ids))

    def partial_key(self, image_ids: Sequence[str]) -> str:
        """``work/<stage>/<content key>.partial.parquet`` (a shard with a missing input)"""
        return shard_partial_key(self.stage, self.content_key(image_ids))


def stored_shard(storage: Storage, spec: ShardSpec, image_ids: Sequence[str]) -> dict[str, Any] | None:
    """The stored result of this shard (``{"key", "stats", "reused": True}``) when both
    its files exist in ``storage``, else None."""
    key, stats_key = spec.key(image_ids), spec.stats_key(image_ids)
    if not storage.exists(key):
        return None
    try:
        stats = json.loads(storage.get_text(stats_key))
    except KeyError:
        return None  # the parquet without its stats: an interrupted write, compute again
    return {"key": key, "stats": stats, "reused": True}


def write_shard(storage: Storage, spec: ShardSpec, image_ids: Sequence[str], table: pa.Table,
                stats: dict[str, Any]) -> dict[str, Any]:
    """Write the shard's rows, then its stats (last: the stats file marks it complete)."""
    key = spec.key(image_ids)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    storage.put(key, buf.getvalue(), content_type="application/vnd.apache.parquet")
    storage.put_text(spec.stats_key(image_ids), json.dumps(stats, sort_keys=True, default=str))
    return {"key": key, "stats": stats, "reused": False}


def run_shard(storage: Storage, spec: ShardSpec, image_ids: list[str],
              compute: Callable[[list[str]], ShardOutput], refresh: bool = False) -> dict[str, Any]:
    """The contract: reuse the shard's stored output when it exists (unless ``refresh``:
    then compute it again and overwrite it), else ``compute(image_ids)`` → ``(rows, stats)``
    and write both. Returns ``{"key", "stats", "reused"}`` (small: that is all that goes
    through Prefect)."""
    stored = None if refresh else stored_shard(storage, spec, image_ids)
    if stored is not None:
        return stored
    try:
        table, stats = compute(image_ids)
    finally:
        release_freed_memory()  # the shard's decode buffers: a 50-shard run kept +28 MB of freed pages
    stats = {"images": len(image_ids), **stats}
    if stats.get("incomplete"):  # an input was missing: keep the rows, never as the done shard
        key = spec.partial_key(image_ids)
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        storage.put(key, buf.getvalue(), content_type="application/vnd.apache.parquet")
        return {"key": key, "stats": stats, "reused": False, "incomplete": stats["incomplete"]}
    return write_shard(storage, spec, image_ids, table, stats)


def submit_bounded(task: Any, calls: Iterable[dict[str, Any]], limit: int, *,
                   sizes: Sequence[int] | None = None) -> list[Any]:
    """``task.submit(**kw)`` for every ``kw`` of ``calls`` with at most ``limit`` runs in
    flight (results in the order of ``calls``). Prefect's thread runner starts every
    submitted task at once, so without a bound a stage would run all its shards together
    and its memory would grow with the corpus (``bench/memory.py``). A slot is refilled
    as soon as any run finishes (:func:`prefect.futures.as_completed`), not in submission
    order: one slow shard does not hold the others' slots idle. With ``sizes`` (images per
    call), one log line per finished call gives images/s and the time left, and a
    progress artifact follows it (:class:`_Progress`).

    Nothing stands between a finished run and the next submission: the progress artifact
    is created once the first runs are going, and each finished run is reported (an API
    call and a log line) after its slot has been refilled, while the new run works."""
    from prefect.futures import as_completed

    limit = max(1, int(limit))
    in_flight: dict[Any, int] = {}
    results: dict[int, Any] = {}
    todo = iter(enumerate(calls))
    progress = _Progress(sizes, getattr(task, "name", "shards")) if sizes and len(sizes) > 1 else None

    def refill() -> None:
        while len(in_flight) < limit:
            nxt = next(todo, None)
            if nxt is None:
                return
            i, kw = nxt
            in_flight[task.submit(**kw)] = i

    refill()
    if progress:
        progress.publish()
    while in_flight:
        future = next(as_completed(list(in_flight)))
        i = in_flight.pop(future)
        results[i] = future.result()  # a failed run raises here, before another is submitted
        refill()
        if progress:
            progress.done(i)
    return [results[i] for i in range(len(results))]


class _Progress:
    """One line per finished shard: images done, images/s so far, time left; and the
    stage's progress artifact (:meth:`publish`, then updated per finished shard)."""

    def __init__(self, sizes: Sequence[int], what: str):
        self.sizes, self.what, self.start = list(sizes), what, time.monotonic()
        self.total, self.finished, self.images = sum(self.sizes), 0, 0
        self.artifact: Any = None

    def publish(self) -> None:
        """Create the progress artifact (at 0 %)."""
        self.artifact = _progress_artifact(self.what)

    def done(self, i: int) -> None:
        """Call ``i`` (its index in ``sizes``) has finished."""
        self.finished += 1
        self.images += self.sizes[i]
        rate = self.images / max(time.monotonic() - self.start, 1e-6)
        eta = (self.total - self.images) / rate if rate > 0 else 0.0
        if self.artifact is not None:
            try:
                from prefect.artifacts import update_progress_artifact

                update_progress_artifact(self.artifact, round(100 * self.images / max(self.total, 1), 1))
            except Exception:  # noqa: BLE001 - the log line below still shows progress
                self.artifact = None
        _logger().info("%s: shard %d/%d done, %d/%d images, %.1f img/s, %s left", self.what, self.finished,
                       len(self.sizes), self.images, self.total, rate, _duration(eta))


def _progress_artifact(what: str) -> Any:
    """A Prefect progress artifact ``<what>-progress`` (lowercase, digits, dashes) for a
    shard stage, or None outside a flow run."""
    try:
        from prefect.artifacts import create_progress_artifact

        key = re.sub(r"[^a-z0-9-]+", "-", f"{what}-progress".lower()).strip("-")
        return create_progress_artifact(0.0, key=key, description=f"{what}: share of the images done")
    except Exception:  # noqa: BLE001 - outside a flow run: log lines only
        return None


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def _logger() -> Any:
    try:
        from prefect import get_run_logger

        return get_run_logger()
    except Exception:  # noqa: BLE001 - outside a flow run
        return log


def run_shards(
    task: Any, shards: Sequence[list[str]], arguments: Callable[[list[str]], dict[str, Any]], *,
    limit: int | None = None, refresh: bool = False,
) -> tuple[list[dict[str, Any]], list[int]]:
    """Submit ``task(**arguments(ids))`` for every shard (the task calls :func:`run_shard`
    and opens the storage itself: no storage argument here), at most ``limit`` at a time
    (default ``runtime.max_workers``; keyword-only, so a stray positional argument fails
    at the call), with one progress line per finished shard (:class:`_Progress`); returns
    the results and the sizes of the shards that really ran (not reused from storage:
    ``len(ran)`` shards, ``sum(ran)`` images). A :class:`ShardPlan` makes each shard's
    list only as it is submitted. ``refresh``
    (a stage's ``refresh`` parameter) is handed to every task as ``refresh=True``, for its
    :func:`run_shard`: stored shards are computed again and overwritten."""
    from carflow.settings import get_settings
    from tasks.retry import with_retry_policy

    runtime = get_settings().runtime
    task = with_retry_policy(task, runtime)
    extra = {"refresh": True} if refresh else {}
    sizes = shard_sizes(shards)
    results = submit_bounded(task, ({**arguments(ids), **extra} for ids in shards), limit or runtime.max_workers,
                             sizes=sizes)
    return results, [n for n, r in zip(sizes, results, strict=True) if not r.get("reused")]


def read_images(storage: Storage, image_ids: Sequence[str], workers: int = 8,
                window: int = 64, missing: bytes | None = b"") -> Iterator[tuple[str, bytes | None]]:
    """``(image_id, bytes)`` of ``image_ids`` from storage, in order, read in a thread pool
    (I/O bound: S3 GETs) with at most ``window`` reads in flight, so a shard's bytes are
    never all in memory at once. A missing image is ``missing`` (``b""`` by default; the
    clean stage passes None and records it as ``missing``)."""

    def get(image_id: str) -> tuple[str, bytes | None]:
        try:
            return image_id, storage.get_image(image_id)
        except KeyError:
            return image_id, missing

    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque = deque()
        for image_id in image_ids:
            pending.append(pool.submit(get, image_id))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


# ---------------------------------------------------------------------------------------
# load, merge
# ---------------------------------------------------------------------------------------
def load_shard_results(
    storage: Storage, keys: Sequence[str], columns: Sequence[str] | None = None, schema: pa.Schema | None = None
) -> pa.Table:
    """The shards' rows as one Arrow table: only ``columns`` (all when None) are read.
    ``schema`` types the empty table when there is no shard."""
    def read(key: str) -> pa.Table:
        return pq.read_table(io.BytesIO(storage.get(key)), columns=list(columns) if columns else None)

    with ThreadPoolExecutor(max_workers=8) as pool:  # I/O bound (S3 GETs)
        tables = [t for t in pool.map(read, keys) if t.num_rows]
    if tables:
        return pa.concat_tables(tables, promote_options="permissive")
    if schema is not None:
        names = list(columns) if columns else schema.names
        return pa.schema([schema.field(n) for n in names]).empty_table()
    return pa.table({"image_id": pa.array([], pa.string())})


def put_column(table: pa.Table, name: str, values: Any) -> pa.Table:
    """``table`` with column ``name`` set to ``values`` (replaced in place, else appended)."""
    i = table.schema.get_field_index(name)
    return table.set_column(i, name, values) if i >= 0 else table.append_column(name, values)


@dataclass
class Match:
    """Manifest rows matched to per-image results (:func:`match_results`)."""

    found: pa.Array  # each row's result row (null: none)
    at: pa.Array  # the same, null for rows dropped before this stage: where results go
    status: Any
    reason: Any


def match_results(status: Any, reason: Any, keys: Any, result_ids: Any, result_status: Any = None,
                  result_reason: Any = None, missing_reason: str = "missing") -> Match:
    """The one rule for merging a stage's per-image results onto manifest rows (each
    row's ``keys`` value looked up in ``result_ids``): only rows kept before this stage
    change status; a result with status dropped drops the row with the result's reason; a
    kept row without a result is dropped with ``missing_reason``. ``result_status`` None:
    results only add columns (and drop the rows they miss)."""
    was_kept = pc.fill_null(pc.equal(status, KEPT), False)
    found = index_in(keys, result_ids)
    at = pc.if_else(was_kept, found, pa.scalar(None, found.type))
    if result_status is not None:
        taken_status, taken_reason = result_status.take(at), result_reason.take(at)
        dropped = pc.fill_null(pc.equal(taken_status, DROPPED), False)
        reason = pc.if_else(dropped, taken_reason.cast(pa.string()), reason)
        status = pc.if_else(dropped, DROPPED, status)
        del taken_status, taken_reason
    missing = pc.and_(was_kept, pc.is_null(at))
    return Match(found, at, pc.if_else(missing, DROPPED, status), pc.if_else(missing, missing_reason, reason))


def stage_shard_results(storage: Storage, keys: Sequence[str], path: Any, columns: Sequence[str],
                        schema: pa.Schema, workers: int = 8) -> Any:
    """The shards' rows (only ``columns``, typed by ``schema``) copied into one local
    Parquet file at ``path``, in row groups of about :data:`carflow.manifest.ROW_GROUP_ROWS`
    (a column read back comes in a few large chunks, each mapped on its own and given back
    whole when freed), with at most ``workers`` shards (read in threads: S3 GETs) and one
    row group in memory at once: a reduce that reads it a column at a time never holds
    every shard's rows (:func:`load_shard_results` does). Returns ``path``."""
    target = pa.schema([schema.field(n) for n in columns])

    def read(key: str) -> pa.Table:
        t = pq.read_table(pa.BufferReader(storage.get(key)), columns=list(columns))
        return pa.Table.from_arrays([t[n].cast(target.field(n).type) for n in columns], schema=target)

    group: list[pa.Table] = []

    def add(table: pa.Table | None) -> None:  # shards gathered into row groups of ROW_GROUP_ROWS
        if table is not None:
            group.append(table)
        rows = sum(t.num_rows for t in group)
        if group and (rows >= ROW_GROUP_ROWS or table is None):
            w.write_table(pa.concat_tables(group).combine_chunks(), row_group_size=max(rows, 1))
            group.clear()

    with ThreadPoolExecutor(max_workers=workers) as pool, pq.ParquetWriter(path, target, compression="lz4") as w:
        pending: deque = deque()
        for key in keys:
            pending.append(pool.submit(read, key))
            if len(pending) >= workers:
                add(pending.popleft().result())
        while pending:
            add(pending.popleft().result())
        add(None)
    release_freed_memory()  # the shards' bytes and tables, freed a piece at a time
    return path


class TakenColumn:
    """Column ``name`` of a local Parquet file (staged shard rows) as seen from manifest
    rows (``at``: each row's result row, null for none), read only where asked: ``take(rows)``
    reads just the row groups holding those rows. Dedup reads the colour thumbnails of
    the nodes in a hash pair this way, not the whole column (192 bytes per image)."""

    def __init__(self, path: Any, name: str, at: pa.Array | pa.ChunkedArray):
        self.path, self.name = path, name
        self.at = pc.fill_null(at, -1).to_numpy(zero_copy_only=False).astype(np.int64)

    def take(self, rows: Any) -> pa.Array:
        want = self.at[np.asarray(rows, dtype=np.int64)]
        pf = pq.ParquetFile(self.path)
        field = pf.schema_arrow.field(self.name)
        sizes = [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)]
        starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
        group = np.searchsorted(starts, want, side="right") - 1
        asked = np.flatnonzero(want >= 0)
        asked = asked[np.argsort(group[asked], kind="stable")]  # by row group
        pieces: list[pa.Array] = []
        for part in np.split(asked, np.flatnonzero(np.diff(group[asked])) + 1) if asked.size else []:
            g = int(group[part[0]])
            col = pf.read_row_group(g, columns=[self.name]).column(0)
            pieces.append(col.take(pa.array(want[part] - starts[g])).combine_chunks())
        values = pa.concat_arrays(pieces) if pieces else pa.array([], field.type)
        slot = np.full(want.size, -1, dtype=np.int64)
        slot[asked] = np.arange(asked.size)
        return values.take(pa.array(slot, pa.int64(), mask=slot < 0))


def merge_results(
    manifest: pa.Table,
    results: pa.Table,
    columns: Sequence[str],
    missing_reason: str,
    on: str = "image_id",
    only_kept: bool = True,
) -> pa.Table:
    """Per-image ``results`` (keyed by ``image_id``) → ``columns`` on the manifest rows
    (matched on the manifest's ``on``), row order unchanged.

    Only rows kept before this stage change status. A result with ``status`` dropped drops
    the row with the result's ``reason``; a kept row without a result is dropped with
    ``missing_reason`` (a row is never silently lost). Rows dropped earlier keep their
    status and reason, and get nulls in ``columns`` unless ``only_kept`` is False.
    ``results`` without a ``status`` column only add columns (and drop the rows they
    miss).

    The columns are taken one at a time and each is let go once taken: a caller that
    hands ``results`` over without keeping a reference (``merge_results(m, parts.pop(),
    …)``) never holds the results and the merged columns whole at once (each freed
    column's pages go back to the OS: :func:`carflow.memory.release_freed_memory`)."""
    has_status = "status" in results.column_names
    m = match_results(manifest["status"], manifest["reason"], manifest[on], results["image_id"],
                      results["status"] if has_status else None, results["reason"] if has_status else None,
                      missing_reason)
    out = put_column(put_column(manifest, "status", m.status), "reason", m.reason)
    at = m.at if only_kept else m.found
    results = results.select(list(dict.fromkeys(columns)))
    for name in list(dict.fromkeys(columns)):
        out = put_column(out, name, results[name].take(at))
        results = results.drop_columns([name])
        release_freed_memory()  # the column's shard chunks, before the next one is taken
    return out


def status_counts(table: pa.Table) -> dict[str, Any]:
    """Rows, kept rows and dropped rows per reason of a manifest (Arrow, no copies)."""
    dropped = pc.fill_null(pc.equal(table["status"], DROPPED), False)
    reasons = pc.value_counts(pc.filter(table["reason"], dropped)).to_pylist()
    return {
        "rows": table.num_rows,
        "kept": table.num_rows - int(pc.sum(dropped).as_py() or 0),
        "dropped_by_reason": dict(sorted((r["values"], r["counts"]) for r in reasons)),
    }


# ---------------------------------------------------------------------------------------
# the gpu slot
# ---------------------------------------------------------------------------------------
#: concurrency limit name → does it exist on the Prefect API (checked once per process)
_LIMITS: dict[tuple[str, str], bool | None] = {}


def limit_exists(name: str) -> bool | None:
    """Whether the global concurrency limit ``name`` exists (None: the API did not say).
    Asked once per process and API: a missing limit is logged once, not per shard."""
    try:
        from prefect.settings import PREFECT_API_URL

        api = str(PREFECT_API_URL.value() or "ephemeral")
    except Exception:  # noqa: BLE001
        api = "?"
    key = (api, name)
    if key in _LIMITS:
        return _LIMITS[key]
    exists: bool | None
    try:
        from prefect.client.orchestration import get_client
        from prefect.exceptions import ObjectNotFound

        try:
            with get_client(sync_client=True) as client:
                client.read_global_concurrency_limit_by_name(name)
            exists = True
        except ObjectNotFound:
            exists = False
            log.warning("Prefect has no global concurrency limit %r: the model stages run without a slot "
                        "(to share a GPU between runs: `prefect gcl create %s --limit 1`)", name, name)
    except Exception as exc:  # noqa: BLE001 - no API: run without the slot
        log.warning("concurrency limit %r not checked (%s); running without it", name, exc)
        exists = None
    _LIMITS[key] = exists
    return exists


@contextmanager
def gpu_slot(name: str = "gpu") -> Iterator[None]:
    """Hold one slot of the Prefect global concurrency limit ``name`` around the body
    (the model stages' inference and training). A missing limit is logged once per
    process (:func:`limit_exists`) and the body runs without a slot; an unreachable
    Prefect API never fails the run; an empty ``name`` takes no slot."""
    with ExitStack() as stack:
        if name and limit_exists(name):
            try:
                from prefect.concurrency.sync import concurrency

                stack.enter_context(concurrency(name, occupy=1, strict=False))
            except Exception as exc:  # noqa: BLE001 - run without the slot rather than fail
                log.warning("concurrency limit %r not taken (%s); running without it", name, exc)
        yield
