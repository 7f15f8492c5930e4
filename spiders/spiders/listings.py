"""The ``listings`` spider: search pages → listing pages → one :class:`ListingItem` each.

    scrapy crawl listings -a site=demo -a base_url=http://127.0.0.1:8765 \
        [-a storage=s3://bucket/prefix] [-a crawl_id=ID] [-a max_listings=N] [-s JOBDIR=DIR]

Everything site-specific comes from the site profile (``spiders/profiles/<site>.yaml``).
Fields are read from schema.org Car/Vehicle/Product JSON-LD first; the profile's CSS
selectors fill whatever the JSON-LD lacks. The spider only *extracts* raw values;
``spiders/pipelines/normalise.py`` normalises them, ``photos.py`` downloads and stores
the photos and ``feed.py`` writes the listing records.

Incremental: on start the spider reads the listing feeds already in storage; a listing
whose id (from its URL, via the profile's ``listing_id_regex``) is known is never
requested, and a known photo URL is never downloaded again (``photos.py``).
Resumable: with ``JOBDIR`` the crawl keeps a journal there (``spiders/journal.py``): its
crawl id from the start, every parsed listing, every stored photo and the feed part being
filled. A crawl stopped gracefully (SIGINT/SIGTERM) or killed (SIGKILL, out of memory)
resumes into the same crawl id with nothing lost and nothing stored downloaded again.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from datetime import datetime, timezone
from typing import Any
from urllib.parse import urlparse

import scrapy
from scrapy.http import Response
from twisted.python.failure import Failure

from spiders.items import ListingItem
from spiders.profile import ResolvedProfile, SiteProfile, load_profile

logger = logging.getLogger(__name__)

STAT = "carflow"
VEHICLE_TYPES = ("Car", "Vehicle", "MotorizedBicycle", "Motorcycle", "Product", "IndividualProduct")
_TYPE_RANK = {t: i for i, t in enumerate(VEHICLE_TYPES)}


def new_crawl_id() -> str:
    """``20261121T101500Z-3f2a``: sortable by time, unique within a second."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(2)


# ---------------------------------------------------------------------------------------
# JSON-LD
# ---------------------------------------------------------------------------------------
def _types(node: dict[str, Any]) -> list[str]:
    value = node.get("@type")
    values = value if isinstance(value, list) else [value]
    out = []
    for v in values:
        if isinstance(v, str):
            out.append(v.rsplit("/", 1)[-1].rsplit(":", 1)[-1])  # "schema:Car", "http://schema.org/Car"
    return out


def _walk(data: Any) -> Iterator[dict[str, Any]]:
    """Every JSON object in a JSON-LD document: top level, lists and ``@graph``."""
    if isinstance(data, list):
        for x in data:
            yield from _walk(x)
    elif isinstance(data, dict):
        yield data
        if "@graph" in data:
            yield from _walk(data["@graph"])
        for key in ("mainEntity", "itemOffered"):
            if isinstance(data.get(key), (dict, list)):
                yield from _walk(data[key])


def jsonld_documents(response: Response) -> tuple[list[Any], int]:
    """Parsed JSON-LD blocks of a page, and how many blocks failed to parse."""
    docs, bad = [], 0
    for raw in response.xpath('//script[@type="application/ld+json"]/text()').getall():
        raw = raw.strip()
        if not raw:
            continue
        try:
            docs.append(json.loads(raw))
        except ValueError:
            # some sites leave trailing commas or raw newlines in strings; try once more leniently
            try:
                docs.append(json.loads(re.sub(r",\s*([}\]])", r"\1", raw), strict=False))
            except ValueError:
                bad += 1
    return docs, bad


def find_vehicle_node(docs: Iterable[Any]) -> dict[str, Any] | None:
    """The best Car/Vehicle/Product node (Car first) in the JSON-LD documents."""
    best, best_rank = None, len(VEHICLE_TYPES)
    for doc in docs:
        for node in _walk(doc):
            for t in _types(node):
                rank = _TYPE_RANK.get(t)
                if rank is not None and rank < best_rank:
                    best, best_rank = node, rank
    return best


def _name(value: Any) -> str | None:
    """A string from a value that may be a string, a {"name": ...} object or a list."""
    if value is None:
        return None
    if isinstance(value, list):
        for v in value:
            name = _name(v)
            if name:
                return name
        return None
    if isinstance(value, dict):
        return _name(value.get("name") or value.get("@value"))
    text = str(value).strip()
    return text or None


def _offer(node: dict[str, Any]) -> dict[str, Any]:
    offers = node.get("offers")
    if isinstance(offers, list):
        offers = next((o for o in offers if isinstance(o, dict)), None)
    if not isinstance(offers, dict):
        return {}
    out = {"price": offers.get("price", offers.get("lowPrice")), "currency": offers.get("priceCurrency")}
    spec = offers.get("priceSpecification")
    if isinstance(spec, list):
        spec = spec[0] if spec else None
    if isinstance(spec, dict):
        out["price"] = out["price"] if out["price"] is not None else spec.get("price")
        out["currency"] = out["currency"] or spec.get("priceCurrency")
    return out


def _jsonld_images(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        url = value.get("contentUrl") or value.get("url")
        return _jsonld_images(url)
    if isinstance(value, list):
        return [u for v in value for u in _jsonld_images(v)]
    return []


def jsonld_fields(node: dict[str, Any] | None) -> dict[str, Any]:
    """Raw field values from a vehicle node (strings or numbers as found, or None)."""
    if not node:
        return {}
    offer = _offer(node)
    year = None
    for key in ("vehicleModelDate", "modelDate", "productionDate", "dateVehicleFirstRegistered", "releaseDate"):
        if node.get(key) not in (None, ""):
            year = node[key]
            break
    return {
        "title": _name(node.get("name")),
        "make": _name(node.get("brand")) or _name(node.get("manufacturer")),
        "model": _name(node.get("model")),
        "year": None if year is None else str(year).strip(),
        "price": offer.get("price"),
        "currency": _name(offer.get("currency")),
        "images": _jsonld_images(node.get("image")),
    }


# ---------------------------------------------------------------------------------------
# HTML
# ---------------------------------------------------------------------------------------
def _first_text(response: Response, selector: str | None) -> str | None:
    if not selector:
        return None
    for value in response.css(selector).getall():
        # a selector without ::text / ::attr returns markup: keep its text only
        if value.lstrip().startswith("<"):
            value = " ".join(scrapy.Selector(text=value).xpath("//text()").getall())
        text = " ".join(value.split())
        if text:
            return text
    return None


def _srcset_candidates(srcset: str) -> Iterator[tuple[str, str]]:
    """(url, descriptor) pairs, tokenised as the HTML standard does: a URL runs to the
    next whitespace (it may hold commas), trailing commas end a candidate."""
    i, n = 0, len(srcset)
    while i < n:
        while i < n and (srcset[i].isspace() or srcset[i] == ","):
            i += 1
        start = i
        while i < n and not srcset[i].isspace():
            i += 1
        url = srcset[start:i]
        if not url:
            break
        if url.endswith(","):
            yield url.rstrip(","), ""
            continue
        start = i
        while i < n and srcset[i] != ",":
            i += 1
        yield url, srcset[start:i].strip()


def parse_srcset(srcset: str) -> str | None:
    """The largest candidate of a ``srcset`` (``w`` descriptors beat ``x``; none = 1x)."""
    best, best_key = None, (-1, -1.0)
    for url, descriptor in _srcset_candidates(srcset):
        kind, value = 0, 1.0  # density
        m = re.fullmatch(r"([\d.]+)([wxh])", descriptor.split()[0]) if descriptor else None
        if m:
            try:
                value = float(m.group(1))
            except ValueError:
                value = 1.0
            kind = 1 if m.group(2) in "wh" else 0
        if (kind, value) > best_key:
            best, best_key = url, (kind, value)
    return best


#: the file name of a lazy-load placeholder or spacer image (``/img/blank.gif``,
#: ``lazy-placeholder.png``, ``spacer_1x1.gif``), never a listing photo
PLACEHOLDER_URL = re.compile(
    r"(?:^|/)[^/?#]*(?:blank|spacer|placeholder|transparent|lazy|loading|loader|pixel|1x1|dummy|empty)"
    r"[^/?#]*\.(?:gif|png|svg|webp)(?:[?#]|$)",
    re.IGNORECASE,
)


def is_placeholder_url(url: str) -> bool:
    return url.lower().startswith(("data:", "javascript:", "about:", "blob:")) or bool(PLACEHOLDER_URL.search(url))


def element_image_url(attrs: dict[str, str], attributes: list[str]) -> str | None:
    """The photo URL of one ``<img>``/``<source>``/``<a>``: the first usable attribute
    (srcset → its largest candidate); lazy-load placeholders (``data:`` URIs, ``blank.gif``,
    ``spacer.png``…) are skipped, so the attribute holding the real photo is read next."""
    for name in attributes:
        value = (attrs.get(name) or "").strip()
        if not value:
            continue
        url = parse_srcset(value) if name.endswith("srcset") else value
        if url and not is_placeholder_url(url):
            return url
    return None


def link_hrefs(response: Response, selector: str | None) -> list[str]:
    """``href``s of the elements a selector matches (or the strings it returns with ``::attr``)."""
    if not selector:
        return []
    out = []
    for el in response.css(selector):
        value = el.root if isinstance(el.root, str) else el.attrib.get("href")
        if value and value.strip() and not value.lstrip().startswith("<"):
            out.append(value.strip())
    return out


def gallery_images(response: Response, selector: str | None, attributes: list[str]) -> list[str]:
    if not selector:
        return []
    out = []
    for el in response.css(selector):
        if isinstance(el.root, str):  # a selector ending in ::attr(...) gives the URL itself
            attrs = {"src": el.root}
        else:
            attrs = dict(el.attrib)
        url = element_image_url(attrs, attributes if "src" in attributes else [*attributes, "src"])
        if url:
            out.append(url)
    return out


def absolute_unique(response: Response, urls: Iterable[str]) -> list[str]:
    seen, out = set(), []
    for url in urls:
        if not isinstance(url, str):
            continue
        url = url.strip()
        if not url or url.lower().startswith("data:"):
            continue
        absolute = response.urljoin(url).split("#", 1)[0]
        if not absolute.startswith(("http://", "https://")):
            continue
        if absolute not in seen:
            seen.add(absolute)
            out.append(absolute)
    return out


def extract_listing(response: Response, profile: SiteProfile, site_id: str) -> tuple[ListingItem, dict[str, int]]:
    """A listing page → an item with raw (not yet normalised) values, and notes for the
    stats (``jsonld``, ``jsonld_invalid``). Per field: JSON-LD first, then the profile's selector."""
    notes: dict[str, int] = {}
    node = None
    if profile.use_jsonld:
        docs, bad = jsonld_documents(response)
        if bad:
            notes["jsonld_invalid"] = bad
        node = find_vehicle_node(docs)
        notes["jsonld" if node else "no_jsonld"] = 1
    ld = jsonld_fields(node)
    sel = profile.fields
    html = {
        name: _first_text(response, getattr(sel, name))
        for name in ("title", "make", "model", "year", "price", "currency")
    }

    def pick(name: str) -> Any:
        value = ld.get(name)
        if value is None or (isinstance(value, str) and not value.strip()):
            return html.get(name)
        return value

    gallery = gallery_images(response, sel.images, profile.image_attributes)
    # page (gallery) order first, then JSON-LD photos the gallery does not show
    image_urls = absolute_unique(response, gallery + ld.get("images", []))
    price = pick("price")
    year = pick("year")
    item = ListingItem(
        listing_id=f"{profile.name}:{site_id}",
        site=profile.name,
        site_id=site_id,
        url=response.url,
        title=pick("title"),
        currency=pick("currency"),
        make_raw=pick("make"),
        model_raw=pick("model"),
        year_raw=None if year is None else str(year),
        attributes={
            "jsonld": node,
            "html": {**html, "images": gallery},
            "price_raw": price,
            "sources": {k: ("jsonld" if ld.get(k) not in (None, "") else "html") for k in html if pick(k) is not None},
        },
        image_urls=image_urls,
        crawled_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    return item, notes


# ---------------------------------------------------------------------------------------
# the spider
# ---------------------------------------------------------------------------------------
class ListingsSpider(scrapy.Spider):
    name = "listings"

    def __init__(
        self,
        site: str | None = None,
        storage: str | None = None,
        crawl_id: str | None = None,
        base_url: str | None = None,
        max_listings: str | int | None = None,
        profile: SiteProfile | None = None,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        if profile is None:
            if not site:
                raise ValueError("the listings spider needs a site profile: -a site=<name or path.yaml>")
            profile = load_profile(site)
        self.profile: SiteProfile = profile
        self.site: str = profile.name
        self.resolved: ResolvedProfile = profile.resolve(base_url)
        self.start_urls = list(self.resolved.start_urls)
        self.allowed_domains = list(self.resolved.allowed_domains)
        self.storage_spec = storage or None
        self.crawl_id_arg = crawl_id or None
        self.max_listings = int(max_listings) if max_listings not in (None, "", "0", 0) else None
        self.crawl_id: str | None = None
        self.storage = None  # opened in open_storage() (nothing happens at construction)
        self.known_listing_ids: set[str] = set()
        #: photo URL → {"image_id", "bytes", "content_type"} from earlier records
        self.known_photos: dict[str, dict[str, Any]] = {}
        self.listings_scheduled = 0
        #: listing ids requested (or recovered) in this session: one request per listing,
        #: however many links or URLs point at it
        self.scheduled_ids: set[str] = set()
        self.journal = None  # a CrawlJournal when the crawl has a JOBDIR (from_crawler)
        self.killed_before = False

    @classmethod
    def from_crawler(cls, crawler, *args: Any, **kwargs: Any) -> ListingsSpider:
        spider = super().from_crawler(crawler, *args, **kwargs)
        # the profile's politeness overrides beat the project defaults, -s on the
        # command line (priority "cmdline") still beats the profile
        for key, value in spider.profile.scrapy_overrides().items():
            crawler.settings.set(key, value, priority="spider")
        spider.open_journal(crawler.settings.get("JOBDIR"))
        spider.open_storage()
        return spider

    # -- set-up ---------------------------------------------------------------------
    def open_journal(self, jobdir: str | None) -> None:
        """With a JOBDIR: open the crawl journal. When the last crawl there was killed,
        Scrapy's request queue and seen-requests file are discarded now, before the
        scheduler opens them: they are incomplete after a kill, and the seen file would
        filter the search pages so that the resumed crawl finds nothing. The search pages
        are walked again instead; what the journal recovered is known and skipped."""
        if not jobdir:
            return
        from spiders.journal import CrawlJournal

        self.journal = CrawlJournal(jobdir)
        if self.journal.killed():
            self.killed_before = True
            gone = self.journal.discard_scheduler_state()
            logger.warning(
                "the last crawl in %s was killed before it could close: resuming crawl %s from its journal "
                "(discarded Scrapy's %s; the search pages are read again, known listings are skipped)",
                jobdir, self.journal.read_marker().get("crawl_id"), ", ".join(gone) or "nothing",
            )

    def open_storage(self) -> None:
        from carflow.storage import open_storage

        self.storage = open_storage(self.storage_spec)

    def inc(self, key: str, count: int = 1) -> None:
        self.crawler.stats.inc_value(f"{STAT}/{key}", count)

    def resolve_crawl_id(self) -> str:
        """``-a crawl_id`` > the id kept in the JOBDIR (journal, else ``spider.state``) > a new one."""
        state = getattr(self, "state", None)
        if state is None:  # no JOBDIR: SpiderState is not enabled
            state = self.state = {}
        kept = (self.journal.read_marker().get("crawl_id") if self.journal else None) or state.get("crawl_id")
        if self.crawl_id_arg and kept and kept != self.crawl_id_arg:
            self.logger.warning("crawl_id %s given, JOBDIR state has %s: using %s", self.crawl_id_arg, kept, self.crawl_id_arg)
        crawl_id = self.crawl_id_arg or kept or new_crawl_id()
        if kept:
            self.inc("resumed")
        state["crawl_id"] = crawl_id
        self.crawl_id = crawl_id
        if self.journal is not None:
            self.journal.begin(crawl_id, self.site)  # on disk now: a kill from here on resumes into it
        return crawl_id

    def recover(self) -> list[ListingItem]:
        """After an earlier session of this crawl (JOBDIR): its unwritten feed parts go to
        storage (before :meth:`load_known` reads the feeds), its stored photos become known
        photo URLs, and the listings it parsed but never finished are returned, to be
        processed again without fetching their pages."""
        if self.journal is None:
            return []
        from carflow.storage import image_key
        from spiders.pipelines.feed import upload_pending_parts

        parts = upload_pending_parts(self.storage, self.site, self.crawl_id, self.journal.feed_dir)
        if parts:
            self.inc("recovered/feed_parts", len(parts))
        self.load_known()
        photos = 0
        for rec in self.journal.photos():
            if rec["url"] not in self.known_photos and self.storage.exists(image_key(rec["image_id"])):
                self.known_photos[rec["url"]] = {k: rec.get(k) for k in ("image_id", "bytes", "content_type")}
                photos += 1
        if photos:
            self.inc("recovered/photos", photos)
        items = []
        fields = set(ListingItem.field_names())
        for rec in self.journal.scraped_items():
            if rec["listing_id"] in self.known_listing_ids:
                continue
            try:
                item = ListingItem(**{k: v for k, v in rec.items() if k in fields})
            except TypeError:
                continue
            item.crawl_id = self.crawl_id
            items.append(item)
        if items:
            self.inc("recovered/listings", len(items))
        return items

    def load_known(self) -> None:
        """Listing ids and photo URL → image_id of every earlier record of this site."""
        from spiders.pipelines.feed import iter_feed_records

        bad = 0
        for rec in iter_feed_records(self.storage, self.site):
            if rec is None:
                bad += 1
                continue
            self.known_listing_ids.add(rec["listing_id"])
            for img in rec.get("images") or []:
                if isinstance(img, dict) and img.get("image_id") and img.get("url"):
                    self.known_photos[img["url"]] = {
                        "image_id": img["image_id"],
                        "bytes": img.get("bytes"),
                        "content_type": img.get("content_type"),
                    }
        self.crawler.stats.set_value(f"{STAT}/known/listings", len(self.known_listing_ids))
        self.crawler.stats.set_value(f"{STAT}/known/photo_urls", len(self.known_photos))
        if bad:
            self.inc("known/bad_feed_line", bad)

    async def start(self) -> AsyncIterator[Any]:
        # spider.state (JOBDIR) is loaded on spider_opened, before start() runs
        self.resolve_crawl_id()
        self.crawler.stats.set_value(f"{STAT}/crawl_id", self.crawl_id)
        self.crawler.stats.set_value(f"{STAT}/site", self.site)
        if self.state.get("finished"):
            self.logger.warning(
                "this JOBDIR holds a crawl that already finished: its requests are marked seen and "
                "nothing new will be crawled. Use a fresh JOBDIR for a new crawl."
            )
        recovered = self.recover() if self.journal is not None else []
        if self.journal is None:
            self.load_known()
        self.logger.info(
            "crawl %s of %s into %s: %d known listings, %d known photo URLs, %d listings recovered",
            self.crawl_id, self.site, self.storage.uri(), len(self.known_listing_ids), len(self.known_photos),
            len(recovered),
        )
        for item in recovered:
            self.scheduled_ids.add(item.listing_id)
            self.listings_scheduled += 1
            yield item
        for url in self.start_urls:
            # after a kill the seen-requests file is gone; a graceful resume keeps it and
            # its queue holds the pages still to do
            yield scrapy.Request(url, callback=self.parse_search, errback=self.search_failed)

    def closed(self, reason: str) -> None:
        state = getattr(self, "state", None)
        if state is not None and reason == "finished":
            state["finished"] = True  # saved to JOBDIR/spider.state after this (SpiderState)
        if self.journal is not None:
            self.journal.end(reason)

    # -- search pages ---------------------------------------------------------------
    def parse(self, response: Response, **kwargs: Any) -> Any:
        return self.parse_search(response)

    def parse_search(self, response: Response) -> Iterator[scrapy.Request]:
        self.inc("search/pages")
        try:
            hrefs = link_hrefs(response, self.profile.listing_links)
            next_links = link_hrefs(response, self.profile.pagination)
        except Exception as exc:  # a non-HTML search page: count it, keep going
            self.inc("search/failed/parse_error")
            self.logger.warning("search page %s: %s", response.url, exc)
            return
        for href in hrefs:
            url = response.urljoin(href.strip()).split("#", 1)[0]
            if not self.is_allowed(url):
                self.inc("search/offsite_link")  # never requested (offsite middleware: the safety net)
                continue
            site_id = self.profile.listing_site_id(url)
            if site_id is None:
                self.inc("search/link_without_id")
                continue
            self.inc("search/listing_links")
            listing_id = f"{self.site}:{site_id}"
            if listing_id in self.known_listing_ids:
                self.inc("listing/known_skipped")
                continue
            if listing_id in self.scheduled_ids:
                self.inc("search/duplicate_link")
                continue
            if self.max_listings is not None and self.listings_scheduled >= self.max_listings:
                self.crawler.stats.set_value(f"{STAT}/listing/max_listings_reached", 1)
                return  # no more listings, no more pages
            self.listings_scheduled += 1
            self.scheduled_ids.add(listing_id)
            yield scrapy.Request(
                url,
                callback=self.parse_listing,
                errback=self.listing_failed,
                meta={"carflow_site_id": site_id, "carflow_listing_id": listing_id},
            )
        for href in next_links[:1]:
            if href and href.strip():
                yield scrapy.Request(response.urljoin(href.strip()), callback=self.parse_search, errback=self.search_failed)

    def is_allowed(self, url: str) -> bool:
        """The URL's host is one of ``allowed_domains`` or a subdomain (Scrapy's rule)."""
        if not self.allowed_domains:
            return True
        host = (urlparse(url).hostname or "").lower()
        return any(host == d or host.endswith("." + d) for d in self.allowed_domains)

    def search_failed(self, failure: Failure) -> None:
        self.inc(f"search/failed/{failure_reason(failure)}")
        self.logger.warning("search page failed: %s", failure.getErrorMessage())

    # -- listing pages --------------------------------------------------------------
    def parse_listing(self, response: Response) -> Iterator[ListingItem]:
        site_id = response.meta.get("carflow_site_id") or self.profile.listing_site_id(response.url)
        if not site_id:
            self.inc("listing/failed/no_id")
            return
        try:
            item, notes = extract_listing(response, self.profile, site_id)
        except Exception as exc:  # a bad page never stops the crawl
            self.inc("listing/failed/parse_error")
            self.logger.warning("listing %s: parse error %r", response.url, exc)
            return
        for key, count in notes.items():
            self.inc(f"listing/{key}", count)
        item.crawl_id = self.crawl_id
        if self.journal is not None:
            self.journal.scraped(item.to_dict())  # a kill from here on does not refetch the page
        yield item

    def listing_failed(self, failure: Failure) -> None:
        from spiders.middlewares import KnownListing

        if failure.check(KnownListing):
            return  # counted by the middleware
        reason = failure_reason(failure)
        self.inc(f"listing/failed/{reason}")
        request = getattr(failure, "request", None)
        level = logging.INFO if reason in ("robots", "offsite") else logging.WARNING
        self.logger.log(level, "listing %s not crawled (%s): %s", getattr(request, "url", "?"), reason,
                        failure.getErrorMessage())


def failure_reason(failure: Failure) -> str:
    """``http_404``, ``oversized``, ``timeout``, ``robots``, ``offsite`` or ``download_error``."""
    from scrapy.exceptions import IgnoreRequest
    from scrapy.spidermiddlewares.httperror import HttpError

    value = failure.value
    if isinstance(value, HttpError):
        return f"http_{value.response.status}"
    if isinstance(value, IgnoreRequest):
        msg = str(value).lower()
        if "robots" in msg:
            return "robots"
        if "offsite" in msg:
            return "offsite"
        return "ignored"
    text = f"{type(value).__name__} {value}".lower()
    if "max size" in text or "maxsize" in text:
        return "oversized"
    if "timeout" in text or "timed out" in text:
        return "timeout"
    return "download_error"
