"""Crawl: run the Scrapy ``listings`` spider for one site profile.

The spider runs in a subprocess (``python -m scrapy crawl listings``): Twisted's reactor
cannot be restarted inside a long-lived Prefect worker, and a crashed crawl then cannot
take the worker down with it. The crawl writes photos, listing feeds and its stats to
storage; this task returns the stats.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from prefect import task

from carflow.storage import StorageKeyError, open_storage

REPO_ROOT = Path(__file__).resolve().parents[1]


class CrawlError(RuntimeError):
    """The crawl process failed; the message carries the end of its log."""


def new_crawl_id() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())


def crawl_command(
    site: str,
    storage: str | None = None,
    base_url: str | None = None,
    jobdir: str | None = None,
    crawl_id: str | None = None,
    overrides: dict[str, Any] | None = None,
    max_listings: int | None = None,
) -> list[str]:
    cmd = [sys.executable, "-m", "scrapy", "crawl", "listings", "-a", f"site={site}"]
    if storage:
        cmd += ["-a", f"storage={storage}"]
    if base_url:
        cmd += ["-a", f"base_url={base_url}"]
    if crawl_id:
        cmd += ["-a", f"crawl_id={crawl_id}"]
    if max_listings:
        cmd += ["-a", f"max_listings={max_listings}"]
    if jobdir:
        cmd += ["-s", f"JOBDIR={jobdir}"]
    for key, value in (overrides or {}).items():
        cmd += ["-s", f"{key}={value}"]
    return cmd


def resolve_crawl_id(jobdir: str | None, crawl_id: str | None) -> str:
    """A resumed crawl (same JOBDIR) keeps its crawl id, so it writes to the same feed."""
    if crawl_id:
        return crawl_id
    if jobdir:
        marker = Path(jobdir) / "carflow_crawl_id"
        if marker.exists():
            return marker.read_text().strip()
        marker.parent.mkdir(parents=True, exist_ok=True)
        crawl_id = new_crawl_id()
        marker.write_text(crawl_id)
        return crawl_id
    return new_crawl_id()


def site_name(site: str) -> str:
    """Profile name from a profile argument (``demo`` or ``path/to/demo.yaml``)."""
    return Path(site).stem if site.endswith((".yaml", ".yml")) else site


def run_crawl(
    site: str,
    storage: str | None = None,
    base_url: str | None = None,
    jobdir: str | None = None,
    crawl_id: str | None = None,
    overrides: dict[str, Any] | None = None,
    max_listings: int | None = None,
    timeout: float | None = None,
) -> dict[str, Any]:
    """Run one crawl to completion and return its stats (read back from storage)."""
    crawl_id = resolve_crawl_id(jobdir, crawl_id)
    cmd = crawl_command(site, storage, base_url, jobdir, crawl_id, overrides, max_listings)
    env = {**os.environ, "SCRAPY_SETTINGS_MODULE": "spiders.settings"}
    cwd = REPO_ROOT if (REPO_ROOT / "scrapy.cfg").exists() else None
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise CrawlError(f"crawl of {site!r} exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    store = open_storage(storage)
    key = f"crawls/{site_name(site)}/{crawl_id}/stats.json"
    try:
        stats = json.loads(store.get_text(key))
    except StorageKeyError:
        raise CrawlError(f"crawl of {site!r} finished but wrote no stats at {store.uri(key)}:\n{proc.stderr[-4000:]}")
    stats["crawl_id"] = crawl_id
    return stats


@task(name="crawl-site", retries=1, retry_delay_seconds=30)
def crawl_task(
    site: str,
    storage: str | None = None,
    base_url: str | None = None,
    jobdir: str | None = None,
    crawl_id: str | None = None,
    overrides: dict[str, Any] | None = None,
    max_listings: int | None = None,
) -> dict[str, Any]:
    return run_crawl(site, storage, base_url, jobdir, crawl_id, overrides, max_listings)
