"""Crop flow: the largest vehicle of each kept image, as a new content-addressed JPEG.

    python -m flows.crop [--storage URI] [--shard-size N]

Reads ``manifests/car_filter/manifest.parquet`` when the car filter has run, else
``manifests/clean/manifest.parquet``; writes ``manifests/crop/manifest.parquet`` with
the input's columns plus ``bbox`` (padded crop box ``[x0, y0, x1, y1]``, x1/y1
exclusive, in the image's pixels), ``det_class`` (``vehicle``), ``det_conf`` and
``crop_id`` (the crop's image id; ``image_id`` stays the uncropped photo). Kept rows the
detector rejects are dropped with reason ``no_vehicle``, ``too_small`` or
``decode_error``. Shards are cached tasks keyed on stage, version, sorted image ids and
the crop config (including the weights spec and, for a local file, its sha256); each
holds one slot of the Prefect global concurrency limit ``crop.gpu_limit`` (``gpu``)
while it runs inference — a limit that does not exist is only a warning.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from typing import Any

import pandas as pd
from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact

from carflow.manifest import (
    CLEAN_SCHEMA,
    DROPPED,
    KEPT,
    from_pandas,
    manifest_key,
    read_manifest,
    to_pandas,
    write_manifest,
)
from carflow.settings import get_settings
from carflow.storage import open_storage
from tasks.crop import crop_config, crop_shard_task
from tasks.shards import load_shard_results, plan_shards, run_shards

CROP_COLUMNS = ["bbox", "det_class", "det_conf", "crop_id"]


def input_key(store, prefix: str) -> str:
    """The car-filter manifest if that stage has run, else the clean one."""
    car = manifest_key("car_filter", prefix=prefix)
    return car if store.exists(car) else manifest_key("clean", prefix=prefix)


def merge_crops(manifest: pd.DataFrame, results: pd.DataFrame) -> pd.DataFrame:
    """Per-image crop rows → manifest rows (by ``image_id``). Rows dropped before this
    stage keep their status and reason; a kept row without a result is ``not_cropped``."""
    df = manifest.drop(columns=[c for c in CROP_COLUMNS if c in manifest.columns]).copy()
    res = results[["image_id", "status", *CROP_COLUMNS, "reason"]].rename(
        columns={"status": "crop_status", "reason": "crop_reason"}
    )
    df = df.merge(res, how="left", on="image_id")
    was_kept = df["status"] == KEPT
    missing = was_kept & df["crop_status"].isna()
    df.loc[missing, "crop_status"] = DROPPED
    df.loc[missing, "crop_reason"] = "not_cropped"
    drop = was_kept & (df["crop_status"] == DROPPED)
    df.loc[drop, "status"] = DROPPED
    df.loc[drop, "reason"] = df.loc[drop, "crop_reason"]
    # a dropped row keeps its bbox (too_small) but never a crop
    df.loc[~was_kept, CROP_COLUMNS] = None
    return df.drop(columns=["crop_status", "crop_reason"])


@flow(name="crop", log_prints=True)
def crop(storage: str | None = None, shard_size: int | None = None) -> dict[str, Any]:
    """Clean / car-filter manifest → ``manifests/crop/manifest.parquet``."""
    logger = get_run_logger()
    cfg = get_settings()
    store = open_storage(storage)
    prefix = cfg.runtime.manifests_prefix
    source = input_key(store, prefix)
    df = to_pandas(read_manifest(store, source))
    shards = plan_shards(df, shard_size or cfg.ingest.shard_size)
    config = crop_config(cfg.crop)
    results, fresh = run_shards(
        crop_shard_task,
        shards,
        store,
        lambda ids: {"storage_uri": storage, "image_ids": ids, "config": config,
                     "gpu_limit": cfg.crop.gpu_limit, "decode_workers": cfg.crop.decode_workers},
    )
    cropped = load_shard_results(store, [r["key"] for r in results])
    if cropped.empty:
        cropped = pd.DataFrame({c: pd.Series(dtype=object) for c in ["image_id", "status", "reason", *CROP_COLUMNS]})
    df = merge_crops(df, cropped)
    table = from_pandas(df)
    # the input (clean, or car_filter = clean + its columns) keeps its contract
    uri = write_manifest(store, manifest_key("crop", prefix=prefix), table, CLEAN_SCHEMA)
    reasons = Counter(df.loc[df["status"] == DROPPED, "reason"].tolist())
    summary = {
        "manifest": uri,
        "input": store.uri(source),
        "rows": len(df),
        "kept": int((df["status"] == KEPT).sum()),
        "crops": int(df["crop_id"].notna().sum()),
        "dropped_by_reason": dict(sorted(reasons.items())),
        "shards": len(shards),
        "cached_shards": len(shards) - len(fresh),
        "inferred_images": sum(len(ids) for ids in fresh),
        "weights": cfg.crop.weights,
    }
    create_table_artifact(
        key="crop-counts",
        table=[{"reason": "kept", "rows": summary["kept"]}] + [{"reason": r, "rows": n} for r, n in sorted(reasons.items())],
        description="Crop stage: rows per status/reason",
    )
    logger.info("crop manifest %s: %s", uri, {k: summary[k] for k in ("rows", "kept", "crops", "dropped_by_reason")})
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.crop", description=crop.__doc__)
    parser.add_argument("--storage", help="storage URI (default: settings storage)")
    parser.add_argument("--shard-size", type=int, help="images per shard task (default: ingest.shard_size)")
    a = parser.parse_args(argv)
    print(json.dumps(crop(a.storage, a.shard_size), indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
