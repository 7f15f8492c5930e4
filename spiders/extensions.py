"""CrawlStatsWriter: the crawl's Scrapy stats (with the ``carflow/...`` quality counters)
→ ``crawls/<site>/<crawl_id>/stats.json`` in the crawl's storage, when the spider closes
(finished, stopped by SIGINT/SIGTERM, or closed by ``max_listings``).

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
        try:
            storage.put(key, json.dumps(stats, indent=2).encode("utf-8"), content_type="application/json")
            logger.info("crawl stats: %s", storage.uri(key))
        except Exception:
            logger.exception("writing crawl stats to %s failed", storage.uri(key))
