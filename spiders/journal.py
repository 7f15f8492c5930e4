"""The crawl journal: what a crawl has done, on local disk in its ``JOBDIR``, written as it
happens, so a crawl killed without warning (SIGKILL, out of memory, an evicted pod)
resumes without losing a listing or downloading a stored photo again.

Scrapy's own ``JOBDIR`` state (the request queue, the seen-requests file,
``spider.state``) is only complete after a graceful stop: its queue index and
``spider.state`` are written when the crawl closes. The journal is written line by line
(each line flushed to the OS, so it survives the death of the process):

``JOBDIR/carflow/crawl.json``
    the crawl id, written when the crawl starts, and whether the crawl is running; a
    crawl that starts and finds ``running: true`` knows the last one was killed.
``JOBDIR/carflow/scraped.jsonl``
    every listing as its page was parsed (raw values, before the pipelines). A listing
    that was parsed but whose photos had not all arrived is processed again on resume
    from this line, without fetching its page again.
``JOBDIR/carflow/photos.jsonl``
    photo URL → image id, written *before* the photo is put into storage: on resume an
    entry whose ``raw/`` object exists is a known photo and is not downloaded again.
``JOBDIR/carflow/feed/part-NNNNN.jsonl``
    the listing records of the feed part being filled, and of parts not yet uploaded;
    the part's storage key has the same number. On resume every file here is uploaded
    first, so the records are in storage before the crawl reads what it knows.

After an unclean stop the resumed crawl discards Scrapy's request queue and seen-requests
file (both unreliable then) and walks the search pages again: everything the journal
recovered is known and skipped. A graceful stop or the end of a crawl deletes the
scraped/photos journals (every item has then been written to the feed).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

#: Scrapy's scheduler state inside a JOBDIR (queue and seen-request fingerprints)
SCRAPY_SCHEDULER_STATE = ("requests.queue", "requests.seen")


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _read_lines(path: Path) -> Iterator[dict[str, Any]]:
    """JSON lines of ``path``; a torn last line (the process died mid-write) is skipped."""
    if not path.exists():
        return
    with path.open("r", encoding="utf-8", errors="replace") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict):
                yield rec


class CrawlJournal:
    """The journal of the crawl in ``jobdir`` (see the module docstring)."""

    def __init__(self, jobdir: str | os.PathLike[str]):
        self.jobdir = Path(jobdir)
        self.dir = self.jobdir / "carflow"
        self.marker = self.dir / "crawl.json"
        self.scraped_path = self.dir / "scraped.jsonl"
        self.photos_path = self.dir / "photos.jsonl"
        self.feed_dir = self.dir / "feed"
        self._lock = threading.Lock()
        self._files: dict[Path, Any] = {}

    # -- the marker -----------------------------------------------------------------
    def read_marker(self) -> dict[str, Any]:
        try:
            data = json.loads(self.marker.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def killed(self) -> bool:
        """The last crawl in this JOBDIR started and never closed."""
        return bool(self.read_marker().get("running"))

    def discard_scheduler_state(self) -> list[str]:
        """Delete Scrapy's request queue and seen-requests file (call before the
        scheduler opens them). Returns what was deleted."""
        gone = []
        for name in SCRAPY_SCHEDULER_STATE:
            path = self.jobdir / name
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
                gone.append(name)
            elif path.exists():
                path.unlink()
                gone.append(name)
        return gone

    def begin(self, crawl_id: str, site: str) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.feed_dir.mkdir(parents=True, exist_ok=True)
        previous = self.read_marker()
        _atomic_write(self.marker, json.dumps({
            **previous, "crawl_id": crawl_id, "site": site, "running": True, "finished": False,
        }).encode())

    def end(self, reason: str) -> None:
        """A graceful close: every item went through the pipelines, the journals of
        scraped listings and stored photos are no longer needed."""
        self.close_files()
        for path in (self.scraped_path, self.photos_path):
            path.unlink(missing_ok=True)
        if self.dir.is_dir():
            _atomic_write(self.marker, json.dumps({
                **self.read_marker(), "running": False, "finished": reason == "finished", "finish_reason": reason,
            }).encode())

    # -- appends ----------------------------------------------------------------------
    def _append(self, path: Path, record: dict[str, Any]) -> None:
        line = json.dumps(record, ensure_ascii=False, default=str) + "\n"
        with self._lock:
            fh = self._files.get(path)
            if fh is None:
                path.parent.mkdir(parents=True, exist_ok=True)
                fh = self._files[path] = path.open("a", encoding="utf-8")
            fh.write(line)
            fh.flush()  # in the OS from here: survives the process being killed

    def close_files(self) -> None:
        with self._lock:
            for fh in self._files.values():
                fh.close()
            self._files.clear()

    def scraped(self, item: dict[str, Any]) -> None:
        self._append(self.scraped_path, item)

    def photo(self, url: str, image_id: str, size: int | None, content_type: str | None) -> None:
        self._append(self.photos_path, {"url": url, "image_id": image_id, "bytes": size,
                                        "content_type": content_type})

    # -- reads on resume ------------------------------------------------------------
    def scraped_items(self) -> Iterator[dict[str, Any]]:
        """The parsed listings of earlier sessions (the latest line of a listing wins)."""
        latest: dict[str, dict[str, Any]] = {}
        for rec in _read_lines(self.scraped_path):
            if rec.get("listing_id"):
                latest[rec["listing_id"]] = rec
        yield from latest.values()

    def photos(self) -> Iterator[dict[str, Any]]:
        for rec in _read_lines(self.photos_path):
            if rec.get("url") and rec.get("image_id"):
                yield rec
