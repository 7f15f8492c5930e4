"""Crawl flow: one site profile → photos + listing feeds in storage.

    python -m flows.crawl demo --base-url http://127.0.0.1:8765
    carflow crawl path/to/site.yaml --max-listings 20      # a quick trial of a new profile
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact

from flows.entry import entry_point
from tasks.crawl import crawl_task, site_name


def counters(stats: dict[str, Any]) -> list[dict[str, Any]]:
    """The carflow quality counters of a crawl's stats, as table rows."""
    return [{"counter": k, "value": v} for k, v in sorted(stats.items()) if k.startswith("carflow/")]


def artifact_key(site: str) -> str:
    """``crawl-<site name>`` in the characters Prefect allows (lowercase, digits, dashes)."""
    return "crawl-" + (re.sub(r"[^a-z0-9-]+", "-", site.lower()).strip("-") or "site")


@flow(name="crawl", log_prints=True)
def crawl(
    site: str = "demo",
    storage: str | None = None,
    base_url: str | None = None,
    jobdir: str | None = None,
    crawl_id: str | None = None,
    max_listings: int | None = None,
) -> dict[str, Any]:
    """Crawl one site profile into storage and publish its counters as an artifact."""
    stats = crawl_task(site, storage, base_url, jobdir, crawl_id, None, max_listings)
    name = stats.get("carflow/site") or site_name(site)
    create_table_artifact(key=artifact_key(name), table=counters(stats),
                          description=f"crawl {stats.get('crawl_id')} of {name}: quality counters")
    get_run_logger().info("crawl %s of %s: %s", stats.get("crawl_id"), name,
                          {c["counter"]: c["value"] for c in counters(stats)})
    return stats


@entry_point
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="carflow crawl", description=crawl.__doc__)
    parser.add_argument("site", help="site profile: a name (spiders/profiles/<name>.yaml or crawl.profiles_dir) "
                                     "or the path of a YAML file (absolute or relative to here)")
    parser.add_argument("--storage", help="storage URI (default: settings storage)")
    parser.add_argument("--base-url", help="replaces {base_url} in the profile's start URLs")
    parser.add_argument("--jobdir", help="Scrapy JOBDIR: a stopped or killed crawl resumes from here")
    parser.add_argument("--crawl-id")
    parser.add_argument("--max-listings", type=int, help="stop after this many new listings (a quick trial)")
    a = parser.parse_args(argv)
    site = check_site(a.site)  # a bad profile is one line, before any flow run
    stats = crawl(site, a.storage, a.base_url, a.jobdir, a.crawl_id, a.max_listings)
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
