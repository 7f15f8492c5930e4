"""FeedPipeline: listing records → ``listings/<site>/<crawl_id>/part-NNNNN.jsonl`` in storage.

S3 has no append, so records are buffered and a new part is written every
``CARFLOW_FEED_PART_SIZE`` items (default 50) and at close (also on a graceful SIGINT /
SIGTERM stop). A resumed crawl (same crawl id) continues the part numbering after the
parts already there, so it never overwrites what the interrupted run wrote.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from typing import Any

from itemadapter import ItemAdapter

from carflow.keys import feed_part_key as part_key
from carflow.keys import listings_prefix as feed_prefix
from spiders.items import ListingItem

try:
    from scrapy.utils.asyncio import run_in_thread
except ImportError:  # pragma: no cover - Scrapy < 2.15
    from scrapy.utils.defer import maybe_deferred_to_future
    from twisted.internet.threads import deferToThread

    async def run_in_thread(func, *args, **kwargs):
        return await maybe_deferred_to_future(deferToThread(func, *args, **kwargs))


logger = logging.getLogger(__name__)

_PART = re.compile(r"part-(\d+)\.jsonl$")


def iter_feed_records(storage, site: str, batch: int = 32) -> Iterator[dict | None]:
    """Every record of every feed part of ``site`` (oldest crawl first); a malformed line
    yields ``None`` (callers count it). Parts are fetched a batch at a time, concurrently
    (S3: one GET per part)."""
    from concurrent.futures import ThreadPoolExecutor

    keys = sorted(k for k in storage.list(feed_prefix(site)) if k.endswith(".jsonl"))
    with ThreadPoolExecutor(max_workers=8) as pool:
        for i in range(0, len(keys), batch):
            for text in pool.map(storage.get_text, keys[i : i + batch]):
                for line in text.splitlines():
                    if not line.strip():
                        continue
                    try:
                        rec = json.loads(line)
                    except ValueError:
                        yield None
                        continue
                    yield rec if isinstance(rec, dict) and rec.get("listing_id") else None


def to_json_line(item: Any) -> str:
    data = item.to_dict() if isinstance(item, ListingItem) else ItemAdapter(item).asdict()
    return json.dumps(data, ensure_ascii=False, sort_keys=False, default=str)


class FeedPipeline:
    def __init__(self, crawler, part_size: int = 50):
        self.crawler = crawler
        self.part_size = max(1, part_size)
        self.buffer: list[str] = []
        self.next_part: int | None = None

    @classmethod
    def from_crawler(cls, crawler) -> FeedPipeline:
        return cls(crawler, crawler.settings.getint("CARFLOW_FEED_PART_SIZE", 50))

    def open_spider(self) -> None:
        self.buffer = []
        self.next_part = None

    async def process_item(self, item: Any) -> Any:
        self.buffer.append(to_json_line(item))
        self.crawler.stats.inc_value("carflow/listing/new")
        if len(self.buffer) >= self.part_size:
            key, data = self._take()
            try:
                await run_in_thread(self._write, key, data)
            except Exception as exc:  # keep the records: the next flush (or close) retries them
                self._failed(key, data, exc)
            else:
                self._count(data)
        return item

    def close_spider(self) -> None:
        if self.buffer:
            key, data = self._take()
            self._write(key, data)
            self._count(data)

    # -- parts ----------------------------------------------------------------------
    def _take(self) -> tuple[str, bytes]:
        """Take the buffer and a part number (synchronously: no two flushes share one)."""
        spider = self.crawler.spider
        if self.next_part is None:
            existing = [
                int(m.group(1))
                for k in spider.storage.list(feed_prefix(spider.site, spider.crawl_id))
                if (m := _PART.search(k))
            ]
            self.next_part = max(existing, default=-1) + 1
        key = part_key(spider.site, spider.crawl_id, self.next_part)
        self.next_part += 1
        data = ("\n".join(self.buffer) + "\n").encode("utf-8")
        self.buffer = []
        return key, data

    def _write(self, key: str, data: bytes) -> None:
        storage = self.crawler.spider.storage
        storage.put(key, data, content_type="application/x-ndjson")
        logger.info("wrote %s", storage.uri(key))

    def _failed(self, key: str, data: bytes, exc: Exception) -> None:
        logger.error("writing feed part %s failed (%r); its records are kept for the next part", key, exc)
        self.crawler.stats.inc_value("carflow/feed/write_error")
        self.buffer[:0] = data.decode("utf-8").splitlines()

    def _count(self, data: bytes) -> None:
        self.crawler.stats.inc_value("carflow/feed/parts")
        self.crawler.stats.inc_value("carflow/feed/records", data.count(b"\n"))
