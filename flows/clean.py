"""Clean flow: fix → quality → dedup over manifest v0.

    python -m flows.clean [--storage URI]

Shards of a few thousand images are inspected by cached tasks (one decode per image:
fixer, quality scores and hashes); cross-shard dedup is one reduce step over the small
hash table. Publishes a table artifact of counts per reason and contact sheets of a
sample of dropped images per reason (PNG beside the manifest, linked from a markdown
artifact).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from typing import Any

import pandas as pd
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from carflow.manifest import (
    CLEAN_SCHEMA,
    DROPPED,
    INGEST_SCHEMA,
    from_pandas,
    manifest_key,
    read_input,
    to_pandas,
    write_manifest,
)
from carflow.settings import get_settings
from carflow.storage import open_storage
from flows.entry import entry_point
from tasks.clean import inspect_shard_task, merge_inspection
from tasks.dedup import dedup_manifest
from tasks.quality import apply_odd_size
from tasks.report import contact_sheet
from tasks.runners import task_runner
from tasks.shards import load_shard_results, plan_shards, run_shards


@task(name="dedup-reduce", retries=1)
def dedup_task(df: pd.DataFrame, config: dict[str, Any]) -> pd.DataFrame:
    from carflow.settings import DedupSettings

    return dedup_manifest(df, DedupSettings(**config))


def publish_report(store, df: pd.DataFrame, prefix: str, per_reason: int = 12) -> dict[str, str]:
    """Contact sheets of up to ``per_reason`` dropped images per reason (originals, so
    a person sees what was served), stored beside the manifest."""
    sheets: dict[str, str] = {}
    dropped = df[df["status"] == DROPPED]
    for reason, group in sorted(dropped.groupby("reason")):
        sample = group.drop_duplicates("source_id").sort_values("source_id").head(per_reason)
        items = []
        for row in sample.itertuples():
            try:
                data = store.get_image(row.source_id)
            except KeyError:
                data = None
            items.append((data, f"{row.source_id[:10]}"))
        key = f"{prefix}/clean/contact_sheets/{reason}.png"
        store.put(key, contact_sheet(items, title=f"dropped: {reason} ({len(group)} rows)"), content_type="image/png")
        sheets[reason] = store.uri(key)
    return sheets


@flow(name="clean", log_prints=True, task_runner=task_runner("cpu"))
def clean(storage: str | None = None, shard_size: int | None = None) -> dict[str, Any]:
    """Manifest v0 → ``manifests/clean/manifest.parquet`` (every row kept or dropped with a reason)."""
    logger = get_run_logger()
    cfg = get_settings()
    store = open_storage(storage)
    prefix = cfg.runtime.manifests_prefix
    source = read_input(store, manifest_key("ingest", prefix=prefix), INGEST_SCHEMA)
    df = to_pandas(source.table)
    shards = plan_shards(df, shard_size or cfg.ingest.shard_size)
    config = {"fix": cfg.fix.model_dump(mode="json"), "quality": cfg.quality.model_dump(mode="json")}
    results, fresh = run_shards(
        inspect_shard_task, shards, store, lambda ids: {"storage_uri": storage, "image_ids": ids, "config": config}
    )
    cached = len(shards) - len(fresh)
    inspected_images = sum(len(ids) for ids in fresh)
    logger.info("%d shards: %d from cache, %d images decoded", len(shards), cached, inspected_images)

    inspected = load_shard_results(store, [r["key"] for r in results])
    df = merge_inspection(df, inspected)
    df = apply_odd_size(df, cfg.quality)
    df = dedup_task(df, cfg.dedup.model_dump(mode="json"))

    uri = write_manifest(store, manifest_key("clean", prefix=prefix), from_pandas(df), CLEAN_SCHEMA,
                         lineage=source.lineage())
    reasons = Counter(df.loc[df["status"] == DROPPED, "reason"].tolist())
    flags = Counter(f for fl in df["quality_flags"].dropna() for f in fl)
    sheets = publish_report(store, df, prefix)
    create_table_artifact(
        key="clean-counts",
        table=[{"reason": "kept", "rows": int((df["status"] != DROPPED).sum())}]
        + [{"reason": r, "rows": n} for r, n in sorted(reasons.items())]
        + [{"reason": f"flag:{f}", "rows": n} for f, n in sorted(flags.items())],
        description="Clean stage: rows per status/reason and quality flags",
    )
    create_markdown_artifact(
        key="clean-dropped-samples",
        markdown="## Dropped images, sampled per reason\n\n"
        + "\n".join(f"- **{r}** ({reasons[r]} rows): [{u}]({u})" for r, u in sheets.items())
        + f"\n\nManifest: `{uri}`",
    )
    summary = {
        "manifest": uri,
        "rows": len(df),
        "kept": int((df["status"] != DROPPED).sum()),
        "dropped_by_reason": dict(sorted(reasons.items())),
        "flags": dict(sorted(flags.items())),
        "shards": len(shards),
        "cached_shards": cached,
        "inspected_images": inspected_images,
        "contact_sheets": sheets,
    }
    logger.info("clean manifest %s: %s", uri, {k: summary[k] for k in ("rows", "kept", "dropped_by_reason")})
    return summary


@entry_point
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.clean", description=clean.__doc__)
    parser.add_argument("--storage", help="storage URI (default: settings storage)")
    parser.add_argument("--shard-size", type=int, help="images per shard task (default: ingest.shard_size)")
    a = parser.parse_args(argv)
    print(json.dumps(clean(a.storage, a.shard_size), indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
