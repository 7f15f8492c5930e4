"""CrawlStatsWriter: the crawl's Scrapy stats (with the ``carflow/...`` quality counters)
→ ``crawls/<site>/<crawl_id>/stats.json`` in the crawl's storage, when the spider closes
(finished, stopped by SIGINT/SIGTERM, or closed by ``max_listings``). A crawl that ran to
its end but reached nothing (:func:`crawl_failure`) gets ``carflow/failed`` with the
reason; the launcher (``spiders/run.py``) fails on it.

An extension rather than a pipeline because it handles no items. It runs on
``spider_closed`` after Scrapy's CoreStats (lower order), so ``finish_reason``,
``finish_time`` and ``elapsed_time_seconds`` are in the file.
"""

from __future__ import annotations

import json
import logging
from datetime import date, datetime
from typing import Any

from scrapy import signals

from carflow.keys import crawl_stats_key as stats_key

logger = logging.getLogger(__name__)


def jsonable_stats(stats: dict[str, Any]) -> dict[str, Any]:
    """Scrapy's stats dict as JSON-able data (datetimes → ISO strings), keys sorted."""

    def conv(value: Any) -> Any:
        if isinstance(value, (datetime, date)):
            return value.isoformat()
        if isinstance(value, (str, int, float, bool)) or value is None:
            return value
        if isinstance(value, dict):
            return {str(k): conv(v) for k, v in value.items()}
        if isinstance(value, (list, tuple, set)):
            return [conv(v) for v in value]
        return str(value)

    return {str(k): conv(v) for k, v in sorted(stats.items(), key=lambda kv: str(kv[0]))}


def crawl_failure(stats: dict[str, Any]) -> str | None:
    """Why a crawl that ran to its end reached nothing, or None when it reached something:
    no search page answered (an unreachable site, a wrong base URL), or its search pages
    held no link to a listing (the profile's ``listing_links`` / ``listing_id_regex`` do
    not fit the site). Judged on the crawl's totals, so a resumed crawl counts its earlier
    sessions."""
    if stats.get("finish_reason") != "finished":
        return None  # stopped on purpose (SIGINT/SIGTERM): the resumed crawl decides
    site = stats.get("carflow/site", "?")
    pages = int(stats.get("carflow/search/pages", 0) or 0)
    if pages == 0 and not stats.get("carflow/recovered/listings"):
        failed = {k.rsplit("/", 1)[-1]: v for k, v in stats.items() if k.startswith("carflow/search/failed/")}
        why = ", ".join(f"{k}: {v}" for k, v in sorted(failed.items())) or "no response"
        return (f"the crawl of {site} reached none of its search pages ({why}): check that the site is up "
                "and the profile's start_urls / --base-url")
    links = int(stats.get("carflow/search/listing_links", 0) or 0)
    if links == 0 and not stats.get("carflow/recovered/listings"):
        other = int(stats.get("carflow/search/link_without_id", 0) or 0)
        hint = (f"{other} links matched listing_links but not listing_id_regex" if other
                else "no element matched listing_links")
        return (f"the crawl of {site} found 0 listings on {pages} search page(s) ({hint}): check the profile's "
                "listing_links and listing_id_regex against a saved search page")
    return None


def merge_resumed(stats: dict[str, Any], storage, key: str) -> dict[str, Any]:
    """A resumed crawl (JOBDIR) adds its ``carflow/`` counters to those of the earlier
    run(s) of the same crawl id, so ``stats.json`` always holds the crawl's totals. The
    Scrapy stats stay this run's; ``carflow/sessions`` counts the runs."""
    try:
        previous = json.loads(storage.get_text(key))
    except Exception:
        return stats
    merged = dict(stats)
    for name, value in previous.items():
        if (
            name.startswith("carflow/")
            and not name.startswith("carflow/known/")
            and name not in ("carflow/resumed", "carflow/sessions")
            and isinstance(value, int)
            and not isinstance(value, bool)
        ):
            merged[name] = merged.get(name, 0) + value if isinstance(merged.get(name, 0), int) else merged[name]
    merged["carflow/sessions"] = int(previous.get("carflow/sessions", 1)) + 1
    merged["carflow/first_start_time"] = previous.get("carflow/first_start_time") or previous.get("start_time")
    return dict(sorted(merged.items()))


class CrawlStatsWriter:
    def __init__(self, crawler):
        self.crawler = crawler

    @classmethod
    def from_crawler(cls, crawler) -> CrawlStatsWriter:
        ext = cls(crawler)
        crawler.signals.connect(ext.spider_closed, signal=signals.spider_closed)
        return ext

    def spider_closed(self, spider, reason: str) -> None:
        storage = getattr(spider, "storage", None)
        crawl_id = getattr(spider, "crawl_id", None)
        site = getattr(spider, "site", None)
        if storage is None or not crawl_id or not site:
            logger.warning("no crawl id/storage on the spider: crawl stats not written")
            return
        stats = jsonable_stats(self.crawler.stats.get_stats())
        stats.setdefault("finish_reason", reason)
        stats["carflow/crawl_id"] = crawl_id
        stats["carflow/site"] = site
        key = stats_key(site, crawl_id)
        if stats.get("carflow/resumed"):
            stats = merge_resumed(stats, storage, key)
        failure = crawl_failure(stats)
        if failure:
            stats["carflow/failed"] = failure
            logger.error("%s", failure)
        try:
            storage.put(key, json.dumps(stats, indent=2).encode("utf-8"), content_type="application/json")
            logger.info("crawl stats: %s", storage.uri(key))
        except Exception:
            logger.exception("writing crawl stats to %s failed", storage.uri(key))
