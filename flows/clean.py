"""Clean flow: fix → quality → dedup over manifest v0.

    python -m flows.clean [--storage URI] [--shard-size N] [--refresh]

Shards of a few thousand images are inspected by shard tasks (one decode per image:
fixer, quality scores and hashes) whose outputs live in storage (``work/inspect/``) and
are reused whenever they exist (``--refresh``: computed again and overwritten); one
reduce task applies the quality thresholds and actions and dedups over the small hash
table, reading only the columns it needs. Publishes a table artifact of counts per
reason and contact sheets of a sample of dropped images per reason (PNG beside the
manifest, linked from a markdown artifact).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from pydantic import Field

from carflow.keys import manifest_key
from carflow.manifest import INGEST_SCHEMA
from carflow.settings import get_settings
from carflow.storage import open_storage
from flows.entry import entry_point
from flows.params import (
    FlowParams,
    make_parser,
    params_flow,
    parse_params,
    refresh_field,
    storage_field,
)
from tasks.clean import clean_reduce_task, inspect_shard_task, shard_config
from tasks.runners import task_runner
from tasks.shards import plan_input, run_shards


class CleanParams(FlowParams):
    """Manifest v0 → the clean manifest."""

    storage: str | None = storage_field()
    shard_size: int | None = Field(None, ge=1, description="images per shard task (default: ingest.shard_size)")
    refresh: bool = refresh_field("decode every image")


@params_flow(name="clean", log_prints=True, task_runner=task_runner("cpu"))
def clean(params: CleanParams = CleanParams()) -> dict[str, Any]:
    """Manifest v0 → ``manifests/clean/manifest.parquet`` (every row kept or dropped with a reason)."""
    logger = get_run_logger()
    cfg = get_settings()
    storage, shard_size = params.storage, params.shard_size
    prefix = cfg.runtime.manifests_prefix
    source = plan_input(open_storage(storage), manifest_key("ingest", prefix=prefix), INGEST_SCHEMA,
                        shard_size or cfg.ingest.shard_size)
    shards = source.shards
    config = shard_config(cfg.fix, cfg.quality)
    results, fresh = run_shards(
        inspect_shard_task, shards, lambda ids: {"storage_uri": storage, "image_ids": ids, "config": config},
        refresh=params.refresh,
    )
    n_shards, cached, inspected_images = len(shards), len(shards) - len(fresh), sum(fresh)
    del shards, fresh  # the plan's ids: the reduce reads what it needs from storage
    logger.info("%d shards: %d reused from storage, %d images decoded", n_shards, cached, inspected_images)
    reduced = clean_reduce_task(
        storage, source.key, source.hash, [r["key"] for r in results],
        {"quality": cfg.quality.model_dump(mode="json"), "dedup": cfg.dedup.model_dump(mode="json")}, prefix,
    )
    reasons, flags, sheets = reduced["dropped_by_reason"], reduced["flags"], reduced["contact_sheets"]
    create_table_artifact(
        key="clean-counts",
        table=[{"reason": "kept", "rows": reduced["kept"]}]
        + [{"reason": r, "rows": n} for r, n in reasons.items()]
        + [{"reason": f"flag:{f}", "rows": n} for f, n in flags.items()],
        description="Clean stage: rows per status/reason and quality flags",
    )
    create_markdown_artifact(
        key="clean-dropped-samples",
        markdown="## Dropped images, sampled per reason\n\n"
        + "\n".join(f"- **{r}** ({reasons[r]} rows): [{u}]({u})" for r, u in sheets.items())
        + f"\n\nManifest: `{reduced['manifest']}`",
    )
    summary = {
        **{k: reduced[k] for k in ("manifest", "rows", "kept", "dropped_by_reason", "flags")},
        "shards": n_shards,
        "cached_shards": cached,
        "inspected_images": inspected_images,
        "contact_sheets": sheets,
    }
    logger.info("clean manifest %s: %s", summary["manifest"],
                {k: summary[k] for k in ("rows", "kept", "dropped_by_reason")})
    return summary


def parser() -> argparse.ArgumentParser:
    return make_parser("python -m flows.clean", clean.__doc__, CleanParams)


@entry_point
def main(argv: list[str] | None = None) -> int:
    print(json.dumps(clean(parse_params(CleanParams, parser().parse_args(argv))), indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
