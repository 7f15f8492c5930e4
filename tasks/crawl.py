"""Crawl task: one crawl of one site profile, as a Prefect task.

The crawl itself runs in a subprocess started by :func:`spiders.run.run_crawl`
(Twisted's reactor cannot restart inside a long-lived worker, and a crashed crawl
must not take the worker down). This is the one place ``tasks/`` reaches into
``spiders/``, and only for that launcher: no Scrapy code runs in the caller.
"""

from __future__ import annotations

from typing import Any

from prefect import task

from carflow.errors import retry_unless_user_error
from carflow.storage import open_storage
from spiders.run import CrawlError, CrawlFailed, run_crawl, site_name

__all__ = ["CrawlError", "CrawlFailed", "crawl_task", "run_crawl", "site_name"]


@task(name="crawl-site", retries=1, retry_delay_seconds=30, retry_condition_fn=retry_unless_user_error)
def crawl_task(
    site: str,
    storage: str | None = None,
    base_url: str | None = None,
    jobdir: str | None = None,
    crawl_id: str | None = None,
    overrides: dict[str, Any] | None = None,
    max_listings: int | None = None,
) -> dict[str, Any]:
    """Run the crawl to the end; returns its stats (with ``crawl_id``). A retry with the
    same JOBDIR resumes where the failed attempt stopped; a bad profile or argument
    (a ``UserError``) is not retried."""
    # hand the crawl process an absolute storage URI: a relative local root (the
    # default ``data``) means the caller's folder
    storage = open_storage(storage).uri()
    return run_crawl(site, storage, jobdir, crawl_id, overrides, max_listings, base_url=base_url)
