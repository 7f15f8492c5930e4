"""Crawl flow: one site profile → photos + listing feeds in storage.

    python -m flows.crawl demo --base-url http://127.0.0.1:8765
    carflow crawl path/to/site.yaml --max-listings 20      # a quick trial of a new profile
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Annotated, Any

from prefect import get_run_logger
from prefect.artifacts import create_table_artifact
from pydantic import Field

from flows.entry import entry_point
from flows.params import (
    Flag,
    FlowParams,
    make_parser,
    params_flow,
    parse_params,
    storage_field,
)
from tasks.crawl import crawl_task, site_name


class CrawlParams(FlowParams):
    """One crawl of one site profile."""

    site: Annotated[str, Flag(name="site")] = Field(
        "demo", description="site profile: a name (spiders/profiles/<name>.yaml or crawl.profiles_dir) or the path "
                            "of a YAML file (absolute or relative to the working directory)")
    storage: str | None = storage_field()
    base_url: str | None = Field(None, description="replaces {base_url} in the profile's start URLs")
    jobdir: str | None = Field(None, description="Scrapy JOBDIR: a stopped or killed crawl resumes from here")
    crawl_id: str | None = Field(None, description="the crawl's id (default: a new one, or the JOBDIR's)")
    max_listings: int | None = Field(None, ge=1, description="stop after this many new listings (a quick trial)")


def counters(stats: dict[str, Any]) -> list[dict[str, Any]]:
    """The carflow quality counters of a crawl's stats, as table rows."""
    return [{"counter": k, "value": v} for k, v in sorted(stats.items()) if k.startswith("carflow/")]


def artifact_key(site: str) -> str:
    """``crawl-<site name>`` in the characters Prefect allows (lowercase, digits, dashes)."""
    return "crawl-" + (re.sub(r"[^a-z0-9-]+", "-", site.lower()).strip("-") or "site")


@params_flow(name="crawl", log_prints=True)
def crawl(params: CrawlParams = CrawlParams()) -> dict[str, Any]:
    """Crawl one site profile into storage and publish its counters as an artifact."""
    p = params
    stats = crawl_task(p.site, p.storage, p.base_url, p.jobdir, p.crawl_id, None, p.max_listings)
    name = stats.get("carflow/site") or site_name(p.site)
    create_table_artifact(key=artifact_key(name), table=counters(stats),
                          description=f"crawl {stats.get('crawl_id')} of {name}: quality counters")
    get_run_logger().info("crawl %s of %s: %s", stats.get("crawl_id"), name,
                          {c["counter"]: c["value"] for c in counters(stats)})
    return stats


def parser() -> argparse.ArgumentParser:
    return make_parser("carflow crawl", crawl.__doc__, CrawlParams)


@entry_point
def main(argv: list[str] | None = None) -> int:
    params = parse_params(CrawlParams, parser().parse_args(argv))
    # a bad profile is one line, before any flow run
    stats = crawl(params.model_copy(update={"site": check_site(params.site)}))
    print(json.dumps({"crawl_id": stats.get("crawl_id"), "finish_reason": stats.get("finish_reason"),
                      **{c["counter"]: c["value"] for c in counters(stats)}}, indent=2))
    return 0


def check_site(site: str) -> str:
    """The profile argument as the crawl process needs it (a path made absolute), after
    loading it once here: a missing or invalid profile raises ``ProfileError``."""
    from spiders.run import resolve_site

    return resolve_site(site)


if __name__ == "__main__":
    sys.exit(main())
