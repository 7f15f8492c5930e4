"""Clean stage: the inspect shards (map) and the reduce step that turns their per-image
results into the clean manifest.

- **Map** (:func:`inspect_rows`, :func:`inspect_shard_task`): one decode per image
  (:mod:`tasks.fix`: fixer + quality *scores* + hashes) over a shard of unique images,
  under the shard contract of :mod:`tasks.shards`: ``work/inspect/<content key>.parquet``
  in storage, reused whenever it exists. The key covers the fix settings and the few
  quality settings that change a score (:data:`tasks.quality.SCORE_SETTINGS`), never a
  threshold or an action.
- **Reduce** (:func:`reduce_clean`, :func:`clean_reduce_task`): stages manifest v0 and
  the shard columns it needs in local files and reads them a column at a time (the clean
  manifest is written from a :class:`carflow.manifest.ColumnSpool`, never whole in
  memory), and applies what is decided over the whole set: the
  quality thresholds and actions (:func:`tasks.quality.quality_decisions`), the set-level
  ``odd_size`` check, then dedup (:mod:`tasks.dedup`, over a narrow frame of the hash
  columns). Changing a threshold re-decodes nothing and still changes the drops.

Per-image results never pass through Prefect or stay in the flow: the shard tasks return
``{"key", "stats", "reused"}``, the reduce task reads the shards and writes the manifest
itself and returns counts.
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from prefect import task
from prefect.cache_policies import NO_CACHE

from carflow.keys import contact_sheet_key, image_keys, manifest_key
from carflow.manifest import (
    CLEAN_SCHEMA,
    DROPPED,
    INGEST_SCHEMA,
    KEPT,
    ColumnSpool,
    InputError,
    read_column,
    smallest_distinct,
    stage_input,
    write_manifest,
)
from carflow.memory import release_freed_memory
from carflow.settings import DedupSettings, FixSettings, QualitySettings
from carflow.storage import Storage, open_storage
from tasks import fix
from tasks.dedup import COLUMNS as DEDUP_COLUMNS
from tasks.dedup import dedup_table, value_codes
from tasks.fix import MISSING, SCORE_COLUMNS, inspect_schema, inspect_shard
from tasks.quality import SCORE_SETTINGS, apply_odd_size, quality_decisions, scoring_settings
from tasks.report import contact_sheet
from tasks.retry import RETRY
from tasks.shards import (
    ShardSpec,
    TakenColumn,
    match_results,
    put_column,
    read_images,
    run_shard,
    stage_shard_results,
    status_counts,
)

STAGE = "inspect"
#: bump when the shard rows change (2: scores only, quality decisions moved to the reduce)
VERSION = "2"

#: the shard rows: inspect_image's columns without the bytes and the decisions
SHARD_SCHEMA = pa.schema([f for f in inspect_schema(with_out_bytes=False) if f.name != "quality_flags"])
#: what the reduce reads back from the shards (everything it writes or decides on)
RESULT_COLUMNS = SHARD_SCHEMA.names
#: what goes onto the manifest rows: those (less the keys and decisions) and the flags
MANIFEST_COLUMNS = [
    *(n for n in RESULT_COLUMNS if n not in ("image_id", "status", "reason", "out_image_id")), "quality_flags"
]


def shard_config(fix_cfg: FixSettings, quality_cfg: QualitySettings) -> dict[str, Any]:
    """What an inspect shard is keyed on and run with: the fix settings and the quality
    settings that change a score. Thresholds and actions are decided in the reduce."""
    q = quality_cfg.model_dump(mode="json")
    return {"fix": fix_cfg.model_dump(mode="json"), "quality": {k: q[k] for k in SCORE_SETTINGS}}


def shard_spec(config: dict[str, Any]) -> ShardSpec:
    return ShardSpec(STAGE, f"{VERSION}.fix{fix.VERSION}", config)


# ---------------------------------------------------------------------------------------
# map
# ---------------------------------------------------------------------------------------
def inspect_rows(
    storage: Storage,
    image_ids: list[str],
    fix_cfg: FixSettings,
    quality_cfg: QualitySettings,
    workers: int = 2,
) -> tuple[pa.Table, dict[str, Any]]:
    """Inspect one shard: read originals, fix/score/hash, store re-encoded images
    content-addressed. Returns the shard's rows (:data:`SHARD_SCHEMA`) and counters.
    Quality is scored, not decided (every check off here)."""

    # a lost original reads as None: the fixer records it as `missing` (not `empty`), and
    # the shard is `incomplete`, so the next run tries again (tasks.shards.run_shard)
    rows = inspect_shard(read_images(storage, image_ids, missing=None), fix_cfg, scoring_settings(quality_cfg),
                         workers=workers, put_image=storage.put_image)
    status: Counter = Counter()
    reasons: Counter = Counter()
    actions: Counter = Counter()
    for r in rows:
        r.pop("out_bytes", None)
        r.pop("quality_flags", None)
        status[r["status"]] += 1
        if r["reason"]:
            reasons[r["reason"]] += 1
        actions.update(r["fix_actions"] or [])
    stats = {"decoded": len(rows), "status": dict(status), "reasons": dict(sorted(reasons.items())),
             **({"incomplete": reasons[MISSING]} if reasons.get(MISSING) else {}),
             "actions": dict(sorted(actions.items()))}
    return pa.Table.from_pylist(rows, schema=SHARD_SCHEMA), stats


@task(name="inspect-shard", cache_policy=NO_CACHE, **RETRY.io())
def inspect_shard_task(
    storage_uri: str | None, image_ids: list[str], config: dict[str, Any], workers: int | None = None,
    refresh: bool = False,
) -> dict[str, Any]:
    """One shard under the shard contract: its stored output is reused, whatever
    Prefect's local state holds (unless ``refresh``); else it is decoded and written."""
    store = open_storage(storage_uri)
    n = int(workers or min(4, os.cpu_count() or 1))
    fix_cfg, quality_cfg = FixSettings(**config["fix"]), QualitySettings(**config["quality"])
    return run_shard(store, shard_spec(config), image_ids,
                     lambda ids: inspect_rows(store, ids, fix_cfg, quality_cfg, workers=n), refresh=refresh)


# ---------------------------------------------------------------------------------------
# reduce
# ---------------------------------------------------------------------------------------
def decide_quality(results: pa.Table, cfg: QualitySettings) -> pa.Table:
    """Per-image quality decisions on the shard rows: ``quality_flags`` (``[]`` for an
    image the fixer dropped) and, for a check set to ``drop``, status dropped with the
    first such check as reason."""
    kept = pc.fill_null(pc.equal(results["status"], KEPT), False).to_numpy(zero_copy_only=False)
    flags, drop = quality_decisions(results, cfg, active=kept)
    dropping = pc.is_valid(drop)
    results = put_column(results, "status", pc.if_else(dropping, DROPPED, results["status"]))
    results = put_column(results, "reason", pc.if_else(dropping, drop, results["reason"]))
    return put_column(results, "quality_flags", flags)


#: the shard columns the quality decisions read
DECISION_COLUMNS = ["status", "reason", *SCORE_COLUMNS, "grayscale_score"]


def decide_quality_by_shard(results: Any, cfg: QualitySettings) -> tuple[pa.ChunkedArray, ...]:
    """:func:`decide_quality` over the staged shard rows (a local Parquet file,
    :func:`tasks.shards.stage_shard_results`) one row group at a time (the decisions are
    per image): ``(status, reason, quality_flags)`` of every result row."""
    pf = pq.ParquetFile(results)
    parts = [decide_quality(pf.read_row_group(g, columns=DECISION_COLUMNS), cfg)
             for g in range(pf.num_row_groups)]
    if not parts:
        parts = [decide_quality(pa.schema([SHARD_SCHEMA.field(n) for n in DECISION_COLUMNS]).empty_table(), cfg)]
    return tuple(pa.chunked_array([p[n] for p in parts], type=parts[0][n].type)
                 for n in ("status", "reason", "quality_flags"))


def _whole(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    return values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values


def reduce_clean(manifest: Any, results: Any, quality_cfg: QualitySettings, dedup_cfg: DedupSettings,
                 spool: ColumnSpool) -> ColumnSpool:
    """Manifest v0 (a :class:`carflow.manifest.LocalInput` or an Arrow table) + the
    inspect shards' rows (staged in one local Parquet file) → the clean manifest, built
    column by column in ``spool``: neither the shard rows nor the output are ever in
    memory whole (``bench/orchestration.py``).

    ``source_id`` keeps the original bytes' id; ``image_id`` (and ``raw_key``) become the
    re-encoded image's where the fixer re-encoded a kept image. A kept row whose image
    has no result is dropped as ``not_inspected``; rows dropped before keep their status
    and reason (:func:`tasks.shards.match_results`). The set-level decisions (``odd_size``,
    dedup) run on a narrow table of the columns they read; the colour thumbnails are read
    only for the nodes dedup compares (:class:`tasks.shards.TakenColumn`)."""

    def result(name: str) -> pa.ChunkedArray:
        return read_column(results, name)

    names = list(manifest.column_names)
    status, reason, flags = decide_quality_by_shard(results, quality_cfg)
    release_freed_memory()  # the score columns, read and freed a row group at a time
    source_id = manifest["image_id"]
    m = match_results(manifest["status"], manifest["reason"], source_id, result("image_id"), status, reason,
                      "not_inspected")
    at = m.at
    del status, reason
    spool.put("source_id", source_id)
    out_id = result("out_image_id").take(at)
    renamed = pc.fill_null(pc.and_(pc.equal(m.status, KEPT), pc.is_valid(out_id)), False)
    narrow = pa.table({  # one chunk per column: dedup takes from them without combining copies
        "image_id": _whole(pc.if_else(renamed, out_id, source_id)), "status": m.status, "reason": m.reason,
        "quality_flags": flags.take(at), "width": result("width").take(at), "height": result("height").take(at),
    })
    del out_id, flags, m, source_id
    narrow = apply_odd_size(narrow, quality_cfg)
    for name in ("first_seen", "listing_id", "label"):
        if name in names:
            narrow = narrow.append_column(name, manifest[name])
    narrow = narrow.append_column("pixel_hash", value_codes(result("pixel_hash")).take(at))
    for name in ("phash", "dhash"):
        narrow = narrow.append_column(name, result(name).take(at))
    release_freed_memory()
    narrow = dedup_table(narrow, dedup_cfg, thumbs=TakenColumn(results, "thumb", at))
    release_freed_memory()
    # the output, a column at a time: the narrow table's columns first (then it goes); all
    # but the pixel-hash codes are output columns as they stand, so none is read twice
    for name in narrow.column_names:
        if name != "pixel_hash":
            spool.put(name, narrow[name])
    new_keys = image_keys(pc.filter(narrow["image_id"], renamed))  # only the re-encoded images' keys
    del narrow
    release_freed_memory()
    spool.put("raw_key", pc.replace_with_mask(_whole(manifest["raw_key"]), _whole(renamed), _whole(new_keys)))
    del new_keys, renamed
    release_freed_memory()
    for name in names:
        if name not in spool:
            spool.put(name, manifest[name])
    for name in MANIFEST_COLUMNS:
        if name not in spool:
            spool.put(name, result(name), at=at)  # taken a batch at a time
            release_freed_memory()
    spool.names = [*names, "source_id", *MANIFEST_COLUMNS, *DEDUP_COLUMNS]
    return spool


def counts(table: pa.Table) -> dict[str, Any]:
    """Rows, kept, dropped rows per reason and quality flags of the clean manifest."""
    flags = pc.value_counts(pc.list_flatten(table["quality_flags"])).to_pylist()
    return {**status_counts(table), "flags": dict(sorted((r["values"], r["counts"]) for r in flags))}


def publish_report(store: Storage, table: pa.Table, prefix: str, per_reason: int = 12) -> dict[str, str]:
    """Contact sheets of up to ``per_reason`` dropped images per reason (originals, so
    a person sees what was served), stored beside the manifest."""
    sheets: dict[str, str] = {}
    dropped = pc.fill_null(pc.equal(table["status"], DROPPED), False)
    for reason, rows in sorted(counts(table)["dropped_by_reason"].items()):
        of_reason = pc.and_(dropped, pc.fill_null(pc.equal(table["reason"], reason), False))
        items = []
        for source_id in smallest_distinct(pc.filter(table["source_id"], of_reason), per_reason):
            try:
                data = store.get_image(source_id)
            except KeyError:
                data = None
            items.append((data, source_id[:10]))
        key = contact_sheet_key("clean", reason, prefix=prefix)
        store.put(key, contact_sheet(items, title=f"dropped: {reason} ({rows} rows)"), content_type="image/png")
        sheets[reason] = store.uri(key)
    return sheets


@task(name="clean-reduce", cache_policy=NO_CACHE, retries=1)
def clean_reduce_task(storage_uri: str | None, source_key: str, source_hash: str, shard_keys: list[str],
                      config: dict[str, Any], prefix: str = "manifests") -> dict[str, Any]:
    """Stage manifest v0 (the one the flow planned from: ``source_hash``) and the shards in
    a local temporary folder (``TMPDIR``; about twice the clean manifest's size on disk),
    decide, dedup, write the clean manifest (with its lineage) and the contact sheets;
    returns counts (no rows pass through Prefect)."""
    store = open_storage(storage_uri)
    release_freed_memory()  # what the shard tasks freed, before the reduce's columns
    with tempfile.TemporaryDirectory(prefix="carflow-clean-reduce-") as tmp:
        source = stage_input(store, source_key, tmp, INGEST_SCHEMA)
        if source.hash != source_hash:
            raise InputError(f"{store.uri(source_key)} changed while the clean stage ran: run `carflow clean` again")
        results = stage_shard_results(store, shard_keys, Path(tmp) / "results.parquet", RESULT_COLUMNS,
                                      SHARD_SCHEMA)
        spool = reduce_clean(source, results, QualitySettings(**config["quality"]), DedupSettings(**config["dedup"]),
                             ColumnSpool(source.num_rows, Path(tmp) / "spool"))
        uri = write_manifest(store, manifest_key("clean", prefix=prefix), spool, CLEAN_SCHEMA,
                             lineage=source.lineage())
        return {"manifest": uri, **counts(spool), "contact_sheets": publish_report(store, spool, prefix)}
