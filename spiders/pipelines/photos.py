"""PhotosPipeline: download every photo of a listing through Scrapy's engine and store
the original bytes, exactly as served, content-addressed (``storage.put_image`` layout:
``raw/<id[:2]>/<id>``, id = sha256 of the bytes).

Not Scrapy's ImagesPipeline (it re-encodes) nor FilesPipeline (its stores are keyed by
URL hash): a small :class:`~scrapy.pipelines.media.MediaPipeline` subclass, so downloads
are scheduled by the engine with the crawl's concurrency, politeness, robots.txt, offsite
and retry middlewares, and one URL referenced by several listings is downloaded once
per crawl (MediaPipeline caches by request fingerprint).

A response is stored only when it is a 2xx with a non-empty body whose magic bytes are
an image (JPEG/PNG/GIF/WEBP/BMP/TIFF/AVIF/HEIC). Broken-but-real images (truncated,
CMYK, bombs…) *are* stored as served: fixing them is a later stage. Everything else is
recorded in the item as ``status='rejected'`` with a ``reason``:

====================  =============================================================
``empty``             0-byte body
``not_image``         the body is not an image (e.g. an HTML page served as .jpg)
``placeholder``       an image under 16 px on its longer side: a lazy-load placeholder or
                      spacer (1×1 GIF…) that a profile's attributes picked up, not a photo
``http_<code>``       HTTP error status (404, 410, 500 after retries, …)
``oversized``         larger than ``DOWNLOAD_MAXSIZE`` (the download is aborted)
``robots``/``offsite``  the request was filtered (robots.txt, not an allowed domain)
``download_error``    any other download failure (connection, timeout, …)
``storage_error``     the storage write failed
====================  =============================================================

Counters (crawl stats): per photo reference of an item ``carflow/photo/ref/stored``,
``carflow/photo/known_url_skipped``, ``carflow/photo_rejected/<reason>``; per download
``carflow/photo/downloaded``, ``carflow/photo/stored`` (new object written),
``carflow/photo/already_stored`` (bytes were already in storage).
"""

from __future__ import annotations

import io
import logging
import threading
from typing import Any

from scrapy.exceptions import IgnoreRequest
from scrapy.http import Request
from scrapy.pipelines.media import MediaPipeline
from twisted.python.failure import Failure

from carflow.imageio import IMAGE_FORMATS, sniff
from carflow.storage import image_key, sha256_hex
from spiders.items import ListingItem

try:  # logged at DEBUG without a traceback by MediaPipeline (Scrapy ≥ 2.13)
    from scrapy.pipelines.media import _MediaRequestFiltered as _QuietFailure
except ImportError:  # pragma: no cover - older Scrapy
    from scrapy.pipelines.media import FileException as _QuietFailure

try:
    from scrapy.utils.asyncio import run_in_thread
except ImportError:  # pragma: no cover - Scrapy < 2.15
    from scrapy.utils.defer import maybe_deferred_to_future
    from twisted.internet.threads import deferToThread

    async def run_in_thread(func, *args, **kwargs):
        return await maybe_deferred_to_future(deferToThread(func, *args, **kwargs))


logger = logging.getLogger(__name__)

#: an image smaller than this on its longer side is a placeholder/spacer, never a photo
PLACEHOLDER_MAX_SIDE = 16


def is_placeholder(body: bytes) -> bool:
    """A tiny image (1×1 GIF, 10×10 "loading" PNG…): read from the header only."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(body)) as im:
            width, height = im.size
    except Exception:  # noqa: BLE001 - not readable here: the clean stage decides
        return False
    return max(width, height) < PLACEHOLDER_MAX_SIDE


def sniff_image(body: bytes) -> str | None:
    """The image format from the magic bytes (``carflow.imageio.sniff``), or None when the
    body is not an image (HTML, text, PDF, unknown)."""
    fmt = sniff(body)
    return fmt if fmt in IMAGE_FORMATS else None


class PhotoRejected(_QuietFailure):
    """A photo download that ended without a storable image; ``reason`` says why."""

    def __init__(self, reason: str, message: str = ""):
        super().__init__(message or reason)
        self.reason = reason


def _reject(url: str, reason: str, size: int | None = None, content_type: str | None = None) -> dict[str, Any]:
    return {"url": url, "image_id": None, "status": "rejected", "reason": reason, "bytes": size,
            "content_type": content_type}


def failure_reason(failure: Failure) -> str:
    value = failure.value
    if isinstance(value, PhotoRejected):
        return value.reason
    if isinstance(value, IgnoreRequest):
        text = str(value).lower()
        return "robots" if "robots" in text else "offsite" if "offsite" in text else "filtered"
    text = f"{type(value).__name__} {value}".lower()
    if "max size" in text or "maxsize" in text or type(value).__name__ in ("DownloadCancelledError", "CancelledError"):
        # Scrapy aborts a download over DOWNLOAD_MAXSIZE with DownloadCancelledError
        # (Content-Length known) or a cancelled Deferred (streamed body)
        return "oversized"
    return "download_error"


class PhotosPipeline(MediaPipeline):
    LOG_FAILED_RESULTS = False  # failures are data: counted and recorded in the item

    def __init__(self, crawler):
        super().__init__(crawler=crawler)
        self.stats = crawler.stats
        self.maxsize = crawler.settings.getint("DOWNLOAD_MAXSIZE")
        self._lock = threading.Lock()
        self._stored: set[str] = set()  # image ids known to be in storage
        self._pending: dict[str, threading.Event] = {}  # image ids being written now

    @classmethod
    def from_crawler(cls, crawler) -> PhotosPipeline:
        return cls(crawler)

    def open_spider(self) -> None:  # noqa: D102 - Scrapy ≥ 2.14 passes no spider
        super().open_spider()

    # -- MediaPipeline interface ----------------------------------------------------
    def get_media_requests(self, item: Any, info: MediaPipeline.SpiderInfo) -> list[Request]:
        if not isinstance(item, ListingItem):
            return []
        return [
            Request(url, meta={"carflow_photo": True, "carflow_listing_id": item.listing_id},
                    # CDNs with hot-link protection want the page as Referer
                    headers={"Accept": "image/avif,image/webp,image/*,*/*;q=0.8", "Referer": item.url})
            for url in item.image_urls
        ]

    def media_to_download(self, request: Request, info, *, item: Any = None):
        known = getattr(info.spider, "known_photos", {}).get(request.url)
        if known:
            return {"url": request.url, "image_id": known["image_id"], "status": "known", "reason": None,
                    "bytes": known.get("bytes"), "content_type": known.get("content_type")}
        return None

    async def media_downloaded(self, response, request: Request, info, *, item: Any = None) -> dict[str, Any]:
        url = request.url
        body = response.body or b""
        ctype = response.headers.get("Content-Type")
        ctype = ctype.decode("latin-1").split(";")[0].strip() if ctype else None
        self.stats.inc_value("carflow/photo/downloaded")
        if not 200 <= response.status < 300:
            return _reject(url, f"http_{response.status}", len(body), ctype)
        if not body:
            return _reject(url, "empty", 0, ctype)
        if self.maxsize and len(body) > self.maxsize:
            return _reject(url, "oversized", len(body), ctype)
        if sniff_image(body) is None:
            return _reject(url, "not_image", len(body), ctype)
        if is_placeholder(body):
            return _reject(url, "placeholder", len(body), ctype)
        journal = getattr(info.spider, "journal", None)
        if journal is not None:  # before the put: a stored photo is always in the journal
            journal.photo(url, sha256_hex(body), len(body), ctype)
        try:
            image_id, new = await run_in_thread(self._store, body, ctype)
        except Exception as exc:
            logger.error("storing photo %s failed: %r", url, exc)
            return _reject(url, "storage_error", len(body), ctype)
        self.stats.inc_value("carflow/photo/stored" if new else "carflow/photo/already_stored")
        return {"url": url, "image_id": image_id, "status": "stored", "reason": None, "bytes": len(body),
                "content_type": ctype}

    def media_failed(self, failure: Failure, request: Request, info):
        reason = failure_reason(failure)
        if reason == "download_error":
            logger.warning("photo %s: download failed: %s", request.url, failure.getErrorMessage())
        raise PhotoRejected(reason, failure.getErrorMessage())

    def item_completed(self, results, item: Any, info) -> Any:
        if not isinstance(item, ListingItem):
            return item
        images = []
        for url, (ok, value) in zip(item.image_urls, results, strict=True):
            if ok and isinstance(value, dict):
                rec = dict(value)
                rec["url"] = url
            else:
                reason = failure_reason(value) if isinstance(value, Failure) else "download_error"
                rec = _reject(url, reason)
            images.append(rec)
            if rec["status"] == "stored":
                self.stats.inc_value("carflow/photo/ref/stored")
            elif rec["status"] == "known":
                self.stats.inc_value("carflow/photo/known_url_skipped")
            else:
                self.stats.inc_value(f"carflow/photo_rejected/{rec['reason']}")
        item.images = images
        return item

    def file_path(self, request, response=None, info=None, *, item=None) -> str:
        # only called for a stored body: the content-addressed key
        return image_key(sha256_hex(response.body)) if response is not None else ""

    # -- storage --------------------------------------------------------------------
    def _store(self, body: bytes, content_type: str | None) -> tuple[str, bool]:
        """Put the bytes under their sha256 once; (image_id, written now?). Two URLs with
        the same bytes downloaded at the same time: the second waits for the first put."""
        storage = self.crawler.spider.storage
        image_id = sha256_hex(body)
        with self._lock:
            if image_id in self._stored:
                return image_id, False
            event = self._pending.get(image_id)
            owner = event is None
            if owner:
                event = self._pending[image_id] = threading.Event()
        if not owner:
            event.wait()
            if image_id in self._stored:
                return image_id, False
            raise OSError(f"storing {image_id} failed in another download")
        ok = False
        try:
            key = image_key(image_id)
            new = not storage.exists(key)
            if new:
                storage.put(key, body, content_type=content_type)
            ok = True
            return image_id, new
        finally:
            with self._lock:
                if ok:
                    self._stored.add(image_id)
                self._pending.pop(image_id, None)
            event.set()
