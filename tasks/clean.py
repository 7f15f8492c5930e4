"""Clean stage plumbing: shard planning, the cached inspect-shard task, and merging the
per-image results back onto the manifest rows.

The per-image logic lives in :mod:`tasks.fix` (fixer + quality + hashes from one decode)
and :mod:`tasks.dedup` (one reduce step over the small hash table).

Sharding (:mod:`tasks.shards`) is stable as data grows, so adding 1% new listings redoes
about 1% of the decoding.
"""

from __future__ import annotations

import io
import json
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from prefect import task

from carflow.caching import content_key, shard_cache_key_fn
from carflow.manifest import DROPPED, KEPT
from carflow.settings import FixSettings, QualitySettings
from carflow.storage import Storage, open_storage
from tasks.fix import MISSING, inspect_schema, inspect_shard, shard_stats
from tasks.retry import RETRY
from tasks.shards import load_shard_results, plan_shards  # noqa: F401 - re-exported

STAGE = "inspect"
#: bump when fix/quality/hash code changes in a way that changes results
VERSION = "2"


def _config(fix_cfg: FixSettings, quality_cfg: QualitySettings) -> dict[str, Any]:
    return {"fix": fix_cfg.model_dump(mode="json"), "quality": quality_cfg.model_dump(mode="json")}


def inspect_shard_to_storage(
    storage: Storage,
    image_ids: list[str],
    fix_cfg: FixSettings,
    quality_cfg: QualitySettings,
    workers: int = 2,
) -> dict[str, Any]:
    """Inspect one shard: read originals, fix/score/hash, store re-encoded images
    content-addressed, and write the shard's rows as Parquet under ``work/inspect/``.
    Returns ``{"key", "stats"}`` (small, so Prefect can persist it as the cached result).

    An original missing from storage is a row with reason ``missing``, and the shard is
    then *incomplete*: its rows go to ``<key>.partial.parquet`` (never the done key)
    and the result says ``incomplete``, so a later run computes it again rather than
    keep a transient miss forever (:func:`tasks.shards.run_shards`)."""
    key = f"work/{STAGE}/{content_key(STAGE, VERSION, image_ids, _config(fix_cfg, quality_cfg))}.parquet"

    def load(image_id: str) -> tuple[str, bytes | None]:
        try:
            return image_id, storage.get_image(image_id)
        except KeyError:
            return image_id, None  # not in storage: `missing`, not an empty file

    with ThreadPoolExecutor(max_workers=8) as pool:  # I/O bound (S3 GETs)
        items = pool.map(load, image_ids)
        rows = inspect_shard(
            items, fix_cfg, quality_cfg, workers=workers, put_image=storage.put_image
        )
    for row in rows:
        row.pop("out_bytes", None)
    stats = shard_stats(rows)
    incomplete = stats["reasons"].get(MISSING, 0)
    if incomplete:
        key = key.removesuffix(".parquet") + ".partial.parquet"
    table = pa.Table.from_pylist(rows, schema=inspect_schema(with_out_bytes=False))
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    storage.put(key, buf.getvalue())
    storage.put_text(
        key.removesuffix(".parquet") + ".stats.json", json.dumps(stats, sort_keys=True)
    )
    return {"key": key, "stats": stats, **({"incomplete": incomplete} if incomplete else {})}


@task(
    name="inspect-shard",
    cache_key_fn=shard_cache_key_fn(STAGE, VERSION, ids_param="image_ids", config_param="config"),
    persist_result=True,
    **RETRY.io(),
)
def inspect_shard_task(
    storage_uri: str | None, image_ids: list[str], config: dict[str, Any]
) -> dict[str, Any]:
    """Cached on (stage, version, sorted image ids, config): a rerun with unchanged
    inputs returns the stored result and decodes nothing."""
    workers = int(config.get("workers") or min(4, os.cpu_count() or 1))
    return inspect_shard_to_storage(
        open_storage(storage_uri),
        image_ids,
        FixSettings(**config["fix"]),
        QualitySettings(**config["quality"]),
        workers=workers,
    )


def merge_inspection(manifest: pd.DataFrame, results: pd.DataFrame) -> pd.DataFrame:
    """Per-image results → manifest rows. ``source_id`` keeps the original bytes' id;
    ``image_id`` becomes the re-encoded image's id where the fixer re-encoded it.
    Rows dropped before this stage keep their status and reason."""
    df = manifest.copy()
    df["source_id"] = df["image_id"]
    res = results.rename(columns={"status": "fix_status", "reason": "fix_reason"})
    df = df.merge(res, how="left", left_on="source_id", right_on="image_id", suffixes=("", "_r"))
    df = df.drop(columns=[c for c in df.columns if c.endswith("_r")])
    was_kept = df["status"] == KEPT
    missing = was_kept & df["fix_status"].isna()
    if missing.any():  # never silently lose a row: an image without a result is recorded
        df.loc[missing, "fix_status"] = DROPPED
        df.loc[missing, "fix_reason"] = "not_inspected"
    drop = was_kept & (df["fix_status"] == DROPPED)
    df.loc[drop, "status"] = DROPPED
    df.loc[drop, "reason"] = df.loc[drop, "fix_reason"]
    has_new = was_kept & df["out_image_id"].notna() & ~drop
    df.loc[has_new, "image_id"] = df.loc[has_new, "out_image_id"]
    df.loc[has_new, "raw_key"] = df.loc[has_new, "image_id"].map(lambda i: f"raw/{i[:2]}/{i}")
    return df.drop(columns=["fix_status", "fix_reason", "out_image_id"], errors="ignore")
