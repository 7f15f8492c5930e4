"""FeedPipeline: listing records → ``listings/<site>/<crawl_id>/part-NNNNN.jsonl`` in storage.

S3 has no append, so records are appended to a local part file as they arrive (in the
crawl's JOBDIR journal, ``spiders/journal.py``, when there is one) and a part is put into
storage every ``CARFLOW_FEED_PART_SIZE`` items (default 50) and at close (also on a
graceful SIGINT / SIGTERM stop). A crawl killed without warning leaves its unwritten
parts in the JOBDIR; the resumed crawl uploads them first. A resumed crawl (same crawl
id) continues the part numbering after the parts already there, so it never overwrites
what the interrupted run wrote.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
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


def _part_number(path: Path) -> int | None:
    m = _PART.search(path.name)
    return int(m.group(1)) if m else None


def upload_pending_parts(
    storage, site: str, crawl_id: str, folder: Path, numbers: set[int] | None = None, stats=None
) -> list[int]:
    """Put the local part files of ``folder`` (all, or those numbered ``numbers``: never
    one still being filled) into storage under the same part number, then delete them.
    A failed put leaves the file for the next call. Returns the part numbers written."""
    done = []
    for path in sorted(folder.glob("part-*.jsonl")):
        number = _part_number(path)
        if number is None or (numbers is not None and number not in numbers):
            continue
        data = path.read_bytes()
        if not data.strip():
            path.unlink(missing_ok=True)
            done.append(number)
            continue
        if not data.endswith(b"\n"):  # a torn last line (killed mid-write): drop it
            data = data[: data.rfind(b"\n") + 1]
        key = part_key(site, crawl_id, number)
        try:
            storage.put(key, data, content_type="application/x-ndjson")
        except Exception as exc:  # kept on disk: the next flush, the close or a resume retries
            logger.error("writing feed part %s failed (%r); its records stay in %s", key, exc, path)
            if stats is not None:
                stats.inc_value("carflow/feed/write_error")
            continue
        path.unlink(missing_ok=True)
        logger.info("wrote %s", storage.uri(key))
        done.append(number)
        if stats is not None:
            stats.inc_value("carflow/feed/parts")
            stats.inc_value("carflow/feed/records", data.count(b"\n"))
    return done


class FeedPipeline:
    """Each record is appended to a local part file as soon as it leaves the photos
    pipeline (in the crawl's JOBDIR journal when there is one, so a killed crawl loses
    nothing, else in a temporary folder); every ``CARFLOW_FEED_PART_SIZE`` records the
    file is closed and put into storage as one part."""

    def __init__(self, crawler, part_size: int = 50):
        self.crawler = crawler
        self.part_size = max(1, part_size)
        self.folder: Path | None = None
        self._tmp: str | None = None
        self.current: int | None = None  # the part being filled
        self.count = 0
        self.next_part: int | None = None
        self._fh = None
        self.closed: set[int] = set()  # closed part files not yet in storage
        self._upload_lock = threading.Lock()

    @classmethod
    def from_crawler(cls, crawler) -> FeedPipeline:
        return cls(crawler, crawler.settings.getint("CARFLOW_FEED_PART_SIZE", 50))

    def open_spider(self) -> None:
        journal = getattr(self.crawler.spider, "journal", None)
        if journal is not None:
            self.folder = journal.feed_dir
        else:
            self._tmp = tempfile.mkdtemp(prefix="carflow-feed-")
            self.folder = Path(self._tmp)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.current, self.count, self.next_part, self._fh = None, 0, None, None
        self.closed = set()

    async def process_item(self, item: Any) -> Any:
        line = to_json_line(item) + "\n"
        if self._fh is None:
            self._open_part()
        self._fh.write(line)
        self._fh.flush()  # in the OS: survives the crawl process being killed
        self.count += 1
        self.crawler.stats.inc_value("carflow/listing/new")
        if self.count >= self.part_size:
            self._close_part()
            await run_in_thread(self._upload)
        return item

    def close_spider(self) -> None:
        self._close_part()
        self._upload()
        if self._tmp:
            left = list(Path(self._tmp).glob("part-*.jsonl"))
            if left:
                logger.error("feed parts could not be written to storage; they are kept in %s", self._tmp)
            else:
                shutil.rmtree(self._tmp, ignore_errors=True)

    # -- parts ----------------------------------------------------------------------
    def _open_part(self) -> None:
        """Start the next part file (numbered after the parts in storage and on disk)."""
        spider = self.crawler.spider
        if self.next_part is None:
            existing = [
                int(m.group(1))
                for k in spider.storage.list(feed_prefix(spider.site, spider.crawl_id))
                if (m := _PART.search(k))
            ]
            existing += [n for p in self.folder.glob("part-*.jsonl") if (n := _part_number(p)) is not None]
            self.next_part = max(existing, default=-1) + 1
        self.current = self.next_part
        self.next_part += 1
        self.count = 0
        self._fh = (self.folder / f"part-{self.current:05d}.jsonl").open("a", encoding="utf-8")

    def _close_part(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self.closed.add(self.current)
        self._fh, self.current, self.count = None, None, 0

    def _upload(self) -> None:
        """Put the closed part files into storage (runs in a thread: the part being
        filled meanwhile is never touched)."""
        spider = self.crawler.spider
        with self._upload_lock:
            written = upload_pending_parts(spider.storage, spider.site, spider.crawl_id, self.folder,
                                           numbers=set(self.closed), stats=self.crawler.stats)
            self.closed.difference_update(written)
