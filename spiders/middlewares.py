"""Downloader middleware: never request a listing page that storage already holds.

The spider already skips known listings when it reads a search page; this catches
listing requests that were queued before their listing became known, e.g. requests
left in a ``JOBDIR`` queue by an interrupted crawl and restored on resume.
"""

from __future__ import annotations

from scrapy.exceptions import IgnoreRequest


class KnownListing(IgnoreRequest):
    """The listing is already in storage (not a failure)."""


class SkipKnownListingsMiddleware:
    def __init__(self, crawler):
        self.crawler = crawler

    @classmethod
    def from_crawler(cls, crawler) -> SkipKnownListingsMiddleware:
        return cls(crawler)

    def process_request(self, request, spider=None):
        listing_id = request.meta.get("carflow_listing_id")
        if not listing_id or request.meta.get("carflow_photo"):
            return None
        spider = self.crawler.spider
        if listing_id in getattr(spider, "known_listing_ids", ()):
            self.crawler.stats.inc_value("carflow/listing/known_skipped")
            raise KnownListing(f"known listing {listing_id}")
        return None
