"""The listings spider on saved HTML (no network): JSON-LD vs fallback selectors,
photo URL extraction, normalisation, site-profile validation."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from scrapy.http import HtmlResponse, Request

from spiders.items import ListingItem
from spiders.pipelines.normalise import normalise_listing, parse_price
from spiders.pipelines.photos import sniff_image
from spiders.profile import ProfileError, load_profile, profile_from_dict
from spiders.spiders.listings import (
    ListingsSpider,
    element_image_url,
    extract_listing,
    parse_srcset,
)

BASE = "http://127.0.0.1:8765"


def _page(body: str, url: str = f"{BASE}/listing/demo-0001.html") -> HtmlResponse:
    html = f"<!doctype html><html><head><title>x</title></head><body>{body}</body></html>"
    return HtmlResponse(url=url, body=html.encode("utf-8"), encoding="utf-8", request=Request(url))


def _jsonld(data) -> str:
    return f'<script type="application/ld+json">{json.dumps(data)}</script>'


def _html_fields(make="VW", model="Golf", year="2017", price="12 345 €", gallery="") -> str:
    dl = "".join(
        f'<dt>{k}</dt><dd class="{k}">{v}</dd>' for k, v in (("make", make), ("model", model), ("year", year)) if v is not None
    )
    return (
        f'<h1 class="title">HTML title</h1><dl>{dl}</dl><span class="price">{price}</span>'
        f'<div class="gallery">{gallery}</div>'
    )


@pytest.fixture(scope="module")
def profile():
    return load_profile("demo")


def _parse(profile, body: str, site_id: str = "demo-0001") -> ListingItem:
    item, _notes = extract_listing(_page(body), profile, site_id)
    normalise_listing(item, profile.make_aliases, profile.default_currency)
    return item


# -- JSON-LD vs selectors -----------------------------------------------------------------
def test_jsonld_car_wins_and_brand_object(profile):
    ld = {
        "@context": "https://schema.org",
        "@type": "Car",
        "name": "JSON-LD title",
        "brand": {"@type": "Brand", "name": "Mercedes"},
        "model": "C Class",
        "vehicleModelDate": "2019",
        "offers": {"@type": "Offer", "price": "23990", "priceCurrency": "EUR"},
        "image": ["/img/a.jpg", f"{BASE}/img/b.jpg"],
    }
    item = _parse(profile, _jsonld(ld) + _html_fields(make="Opel", model="Astra", year="2001", price="1 €",
                                                      gallery='<img src="/img/a.jpg"><img src="/img/c.jpg">'))
    assert item.listing_id == "demo:demo-0001" and item.site == "demo" and item.site_id == "demo-0001"
    assert item.title == "JSON-LD title"
    assert (item.make_raw, item.model_raw, item.year_raw) == ("Mercedes", "C Class", "2019")
    assert (item.make, item.model, item.year) == ("mercedes-benz", "c-class", 2019)
    assert item.label == "mercedes-benz_c-class_2019"
    assert item.price == 23990.0 and item.currency == "EUR"
    # gallery order first, then JSON-LD photos the gallery lacks; absolute; de-duplicated
    assert item.image_urls == [f"{BASE}/img/a.jpg", f"{BASE}/img/c.jpg", f"{BASE}/img/b.jpg"]
    assert item.attributes["jsonld"]["@type"] == "Car"
    assert item.attributes["html"]["make"] == "Opel"  # raw HTML kept next to the JSON-LD


@pytest.mark.parametrize("ld_type", ["Vehicle", "Product", ["Product", "Car"]])
def test_jsonld_brand_as_string_other_types_and_graph(profile, ld_type):
    node = {"@type": ld_type, "brand": "VW", "model": "Polo", "productionDate": "2015-04-01",
            "offers": [{"price": 9999.5, "priceCurrency": "usd"}]}
    doc = {"@context": "https://schema.org", "@graph": [{"@type": "WebPage", "name": "page"}, node]}
    item = _parse(profile, _jsonld(doc) + _html_fields(make=None, model=None, year=None, price=""))
    assert (item.make, item.model, item.year) == ("volkswagen", "polo", 2015)
    assert item.make_raw == "VW"
    assert item.price == 9999.5 and item.currency == "USD"


def test_jsonld_inside_a_list_and_partial_fields_fall_back_per_field(profile):
    docs = [{"@type": "BreadcrumbList"}, {"@type": "Car", "brand": {"name": "Skoda"}}]  # no model/year/price
    item = _parse(profile, _jsonld(docs) + _html_fields(model=" Octavia ", year="03/2018", price="14.990,50 €"))
    assert (item.make, item.model, item.year) == ("skoda", "octavia", 2018)
    assert item.model_raw == "Octavia"  # whitespace-collapsed raw text, not normalised
    assert item.price == 14990.5 and item.currency == "EUR"
    assert item.attributes["sources"]["make"] == "jsonld" and item.attributes["sources"]["model"] == "html"


def test_no_jsonld_uses_selectors_and_invalid_jsonld_is_counted(profile):
    body = '<script type="application/ld+json">{not json</script>' + _html_fields(make="Mercedes", model="A-Klasse")
    item, notes = extract_listing(_page(body), profile, "demo-0002")
    normalise_listing(item)
    assert notes == {"jsonld_invalid": 1, "no_jsonld": 1}
    assert item.title == "HTML title"
    assert (item.make, item.model, item.year, item.label) == ("mercedes-benz", "a-klasse", 2017, "mercedes-benz_a-klasse_2017")
    assert item.price == 12345.0


def test_missing_make_model_gives_no_label_but_a_record(profile):
    item = _parse(profile, '<h1 class="title">Mystery car</h1><div class="gallery"><img src="/img/z.jpg"></div>')
    missing = normalise_listing(item)
    assert item.label is None and item.make is None and item.model is None and item.make_raw is None
    assert "label" in missing and "price" in missing
    assert item.title == "Mystery car" and item.image_urls == [f"{BASE}/img/z.jpg"]


def test_normalisation_keeps_raw_strings(profile):
    item = _parse(profile, _html_fields(make="  VW ", model="Golf  GTI", year="2017 (EZ)"))
    assert (item.make_raw, item.model_raw, item.year_raw) == ("VW", "Golf GTI", "2017 (EZ)")
    assert (item.make, item.model, item.year, item.label) == ("volkswagen", "golf-gti", 2017, "volkswagen_golf-gti_2017")
    assert item.attributes["price_raw"] == "12 345 €"


def test_profile_make_aliases_extend_the_table():
    prof = load_profile("demo").model_copy(update={"make_aliases": {"Vee Dub": "volkswagen"}})
    item = _parse(prof, _html_fields(make="Vee Dub", model="Up"))
    normalise_listing(item, prof.make_aliases)
    assert item.make == "volkswagen" and item.make_raw == "Vee Dub"


# -- photos ---------------------------------------------------------------------------------
def test_gallery_src_data_src_srcset(profile):
    gallery = (
        '<img src="/img/p1.jpg">'
        '<img src="data:image/gif;base64,R0lGODlhAQABAAAAACw=" data-src="/img/p2.jpg">'
        '<img srcset="/img/p3-small.jpg 320w, /img/p3.jpg 1280w, /img/p3-mid.jpg 640w" src="/img/p3-small.jpg">'
        '<img src="data:image/gif;base64,R0lGODlhAQABAAAAACw=">'  # placeholder only: ignored
        '<img src="/cdn/p1.jpg">'  # same photo by a second URL: kept (dedup is by bytes, later)
        '<img src="/img/p1.jpg">'  # same URL twice: once
    )
    item = _parse(profile, _html_fields(gallery=gallery))
    assert item.image_urls == [f"{BASE}/img/p1.jpg", f"{BASE}/img/p2.jpg", f"{BASE}/img/p3.jpg", f"{BASE}/cdn/p1.jpg"]


def test_srcset_parsing():
    assert parse_srcset("/img/x.jpg 640w") == "/img/x.jpg"
    assert parse_srcset("a.jpg 1x, b.jpg 2x") == "b.jpg"
    assert parse_srcset("a.jpg, b.jpg 3x") == "b.jpg"
    assert parse_srcset("https://c/w_640,h_480/a.jpg 640w, https://c/w_1280,h_960/a.jpg 1280w") == "https://c/w_1280,h_960/a.jpg"
    attrs = ["srcset", "data-src", "src"]
    assert element_image_url({"src": "data:image/png;base64,xx", "data-src": "/a.jpg"}, attrs) == "/a.jpg"
    assert element_image_url({"src": "data:image/png;base64,xx"}, attrs) is None


def test_sniff_image_magic_bytes():
    assert sniff_image(b"\xff\xd8\xff\xe0" + b"\0" * 40) == "jpeg"
    assert sniff_image(b"\x89PNG\r\n\x1a\n" + b"\0" * 40) == "png"
    assert sniff_image(b"GIF89a" + b"\0" * 40) == "gif"
    assert sniff_image(b"RIFF\0\0\0\0WEBPVP8 " + b"\0" * 40) == "webp"
    assert sniff_image(b"II*\x00" + b"\0" * 40) == "tiff"
    assert sniff_image(b"<!doctype html><html><body>not found</body></html>") is None
    assert sniff_image(b"") is None


@pytest.mark.parametrize(
    "raw,expected",
    [("12 345 €", (12345.0, "EUR")), ("$12,345.50", (12345.5, "USD")), ("12.345,50 EUR", (12345.5, "EUR")),
     ("£9,999", (9999.0, "GBP")), ("CHF 1'250.-", (1250.0, "CHF")), ("12.345", (12345.0, None)),
     (23990, (23990.0, None)), ("on request", (None, None)), (None, (None, None))],
)
def test_parse_price(raw, expected):
    assert parse_price(raw) == expected


# -- search pages and the spider --------------------------------------------------------------
def test_search_page_skips_known_and_unmatched_links_and_follows_next(profile):
    from scrapy.utils.test import get_crawler

    crawler = get_crawler(ListingsSpider, {"ITEM_PIPELINES": {}})
    spider = ListingsSpider(profile=profile, base_url=BASE)
    spider._set_crawler(crawler)
    spider.known_listing_ids = {"demo:demo-0002"}
    body = (
        '<a class="listing-link" href="/listing/demo-0001.html">1</a>'
        '<a class="listing-link" href="/listing/demo-0002.html">2 (known)</a>'
        '<a class="listing-link" href="/about.html">no id</a>'
        '<a class="next" rel="next" href="/search/page-2.html">next</a>'
    )
    out = list(spider.parse_search(_page(body, f"{BASE}/search/page-1.html")))
    assert [r.url for r in out] == [f"{BASE}/listing/demo-0001.html", f"{BASE}/search/page-2.html"]
    assert out[0].meta["carflow_listing_id"] == "demo:demo-0001"
    stats = crawler.stats.get_stats()
    assert stats["carflow/listing/known_skipped"] == 1 and stats["carflow/search/link_without_id"] == 1
    assert spider.allowed_domains == ["127.0.0.1"]
    assert profile.scrapy_overrides()["DOWNLOAD_MAXSIZE"] == 1048576  # the demo profile's photo cap


# -- profiles -------------------------------------------------------------------------------
def _profile_dict(**changes):
    data = {
        "name": "x",
        "start_urls": ["{base_url}/s"],
        "listing_links": "a.l::attr(href)",
        "listing_id_regex": r"/l/(?P<id>\d+)",
    }
    data.update(changes)
    return data


@pytest.mark.parametrize(
    "changes,field",
    [
        ({"listing_id_regex": "/l/(unclosed"}, "listing_id_regex"),
        ({"listing_id_regex": r"/l/\d+"}, "listing_id_regex"),
        ({"fields": {"price": "span[[["}}, "fields.price"),
        ({"fields": {"colour": "span"}}, "fields.colour"),
        ({"politeness": {"download_maxsize": -5}}, "politeness.download_maxsize"),
        ({"start_urls": ["ftp://x/y"]}, "start_urls"),
        ({"start_urls": []}, "start_urls"),
        ({"name": "Bad Name!"}, "name"),
        ({"listing_links": None}, "listing_links"),
    ],
)
def test_profile_errors_name_the_field(changes, field):
    with pytest.raises(ProfileError) as err:
        profile_from_dict(_profile_dict(**changes), source="test.yaml")
    assert f"\n  {field}:" in str(err.value) and "test.yaml" in str(err.value)


def test_profile_files_and_base_url(tmp_path):
    with pytest.raises(ProfileError, match="no site profile named 'nope'"):
        load_profile("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nstart_urls: [http://x/]\nlisting_links: a\nlisting_id_regex: '(\\d+)'\npolitness: {}\n")
    with pytest.raises(ProfileError, match=r"politness: unknown key"):
        load_profile(bad)
    good = tmp_path / "good.yaml"
    good.write_text("start_urls: ['{base_url}/s']\nlisting_links: a\nlisting_id_regex: '/l/(\\d+)'\n")
    prof = load_profile(good)
    assert prof.name == "good"  # defaults to the file name
    with pytest.raises(ProfileError, match="base_url"):
        prof.resolve(None)
    resolved = prof.resolve("http://localhost:9000/")
    assert resolved.start_urls == ["http://localhost:9000/s"] and resolved.allowed_domains == ["localhost"]
    assert prof.listing_site_id("http://localhost:9000/l/123?x") == "123"


def test_demo_and_template_profiles_are_valid():
    assert load_profile("demo").name == "demo"
    template = load_profile(Path(__file__).resolve().parents[1] / "spiders" / "profiles" / "TEMPLATE.yaml")
    assert template.scrapy_overrides()["DOWNLOAD_MAXSIZE"] == 10485760


# -- on the demo generator's saved pages ----------------------------------------------------
def test_parse_generated_demo_pages(demo_site_dir, profile):
    """Every listing page the demo generator wrote parses to its ground truth."""
    gt = json.loads((demo_site_dir / "ground_truth.json").read_text())
    seen_jsonld = Counter()
    for listing in gt["listings"]:
        html_path = demo_site_dir / listing["url"].lstrip("/")
        url = BASE + listing["url"]
        resp = HtmlResponse(url=url, body=html_path.read_bytes(), encoding="utf-8", request=Request(url))
        item, notes = extract_listing(resp, profile, listing["site_id"])
        missing = normalise_listing(item, profile.make_aliases, profile.default_currency)
        seen_jsonld.update(notes)
        assert item.listing_id == listing["listing_id"]
        assert (item.make, item.model, item.year, item.label) == (
            listing["make"], listing["model"], listing["year"], listing["label"]), listing["site_id"]
        raw = listing["make_raw"]
        assert item.make_raw == (" ".join(raw.split()) if raw else None)  # raw text, whitespace-trimmed
        assert ("label" in missing) == (listing["label"] is None)
        assert item.price == pytest.approx(float(listing["price"])) and item.currency == "EUR"
        assert bool(item.attributes["jsonld"]) == listing["has_jsonld"]
        # every ground-truth photo is found, by its URL or its CDN mirror; nothing else
        found = [u.removeprefix(BASE) for u in item.image_urls]
        for photo in listing["photos"]:
            assert {photo["url"], *photo["alt_urls"]} & set(found), (listing["site_id"], photo["url"])
        allowed = {u for photo in listing["photos"] for u in [photo["url"], *photo["alt_urls"]]}
        assert set(found) <= allowed
        assert not any(u.startswith("data:") for u in item.image_urls)
    assert seen_jsonld["jsonld"] == sum(x["has_jsonld"] for x in gt["listings"]) > 0


# -- bad pages and photos are counted, never raised ------------------------------------------
def _spider(profile):
    from scrapy.utils.test import get_crawler

    crawler = get_crawler(ListingsSpider, {"ITEM_PIPELINES": {}})
    spider = ListingsSpider(profile=profile, base_url=BASE)
    spider._set_crawler(crawler)
    spider.crawl_id = "c1"
    return spider, crawler.stats


def test_bad_listing_pages_become_counters(profile):
    from scrapy.http import Response
    from scrapy.spidermiddlewares.httperror import HttpError
    from twisted.python.failure import Failure

    spider, stats = _spider(profile)
    url = f"{BASE}/listing/demo-0009.html"
    not_html = Response(url=url, body=b"\x89PNG\r\n\x1a\n...", request=Request(url, meta={"carflow_site_id": "demo-0009"}))
    assert list(spider.parse_listing(not_html)) == []
    spider.listing_failed(Failure(HttpError(Response(url=url, status=404, request=Request(url)), "404")))
    ok = _page(_html_fields(), url)
    ok.meta["carflow_site_id"] = "demo-0009"
    (item,) = list(spider.parse_listing(ok))
    assert item.crawl_id == "c1" and item.listing_id == "demo:demo-0009"
    got = stats.get_stats()
    assert got["carflow/listing/failed/parse_error"] == 1 and got["carflow/listing/failed/http_404"] == 1


def test_photo_failure_reasons_and_content_addressed_store(tmp_path):
    from scrapy.exceptions import DownloadCancelledError, IgnoreRequest
    from scrapy.utils.test import get_crawler
    from twisted.internet.error import ConnectionRefusedError
    from twisted.python.failure import Failure

    from carflow.storage import LocalStorage, image_key, sha256_hex
    from spiders.pipelines.photos import PhotoRejected, PhotosPipeline, failure_reason

    assert failure_reason(Failure(DownloadCancelledError("Expected to receive 2000000 bytes which is larger "
                                                         "than download max size (1048576)"))) == "oversized"
    assert failure_reason(Failure(IgnoreRequest("Forbidden by robots.txt"))) == "robots"
    assert failure_reason(Failure(ConnectionRefusedError())) == "download_error"
    assert failure_reason(Failure(PhotoRejected("http_410"))) == "http_410"

    crawler = get_crawler(ListingsSpider, {"ITEM_PIPELINES": {}})
    pipe = PhotosPipeline.from_crawler(crawler)
    crawler.spider = type("S", (), {"storage": LocalStorage(tmp_path)})()
    body = b"\xff\xd8\xff\xe0" + b"photo" * 20
    assert pipe._store(body, "image/jpeg") == (sha256_hex(body), True)
    assert pipe._store(body, "image/jpeg") == (sha256_hex(body), False)  # second URL, same bytes
    assert (tmp_path / image_key(sha256_hex(body))).read_bytes() == body  # bytes exactly as served


# -- sites unlike the demo (issue 10) ---------------------------------------------------------
def test_lazy_load_attributes_and_placeholders(profile):
    from spiders.profile import DEFAULT_IMAGE_ATTRIBUTES

    attrs = list(DEFAULT_IMAGE_ATTRIBUTES)
    for name in ("data-lazy", "data-lazy-src", "data-original"):
        assert element_image_url({"src": "/static/p.gif", name: "/photos/1.jpg"}, attrs) == "/photos/1.jpg"
    # a placeholder in src, the photo in an attribute the profile does not list
    for url in ("/img/blank.gif", "/assets/lazy-placeholder.png", "https://cdn.x/spacer_1x1.gif?v=2"):
        assert element_image_url({"src": url}, attrs) is None
        assert element_image_url({"src": url, "href": "/photos/big.jpg"}, attrs) == "/photos/big.jpg"
    assert element_image_url({"src": "/photos/lazy-river-boat.jpg"}, attrs) == "/photos/lazy-river-boat.jpg"
    gallery = ('<img src="/static/p.gif" data-lazy="/fotos/1.jpg"><img src="/img/loading.gif" '
               'data-lazy-src="/fotos/2.jpg"><img src="/img/spacer.gif">')
    item = _parse(profile, _html_fields(gallery=gallery))
    assert [u.rsplit("/", 1)[-1] for u in item.image_urls] == ["1.jpg", "2.jpg"]


def test_placeholder_bodies_are_rejected_and_tiny_real_images_are_too_small():
    import base64
    import io

    from PIL import Image

    from spiders.pipelines.photos import is_placeholder
    from tasks.fix import fix_image

    gif = base64.b64decode("R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7")  # 42 bytes
    assert is_placeholder(gif)
    small = io.BytesIO()
    Image.new("RGB", (24, 18), (200, 10, 10)).save(small, "JPEG")
    assert not is_placeholder(small.getvalue())  # a tiny photo is stored; clean drops it
    assert not is_placeholder(b"<html>not an image</html>")
    # a few bytes that are a real image are too_small in clean, not empty
    assert (fix_image(gif).status, fix_image(gif).reason) == ("dropped", "too_small")
    assert fix_image(b"").reason == "empty"


def test_listing_id_is_matched_on_the_listing_url_not_on_a_url_in_its_query():
    p = profile_from_dict({"name": "x", "start_urls": ["https://x.example/s"], "listing_links": "a::attr(href)",
                           "listing_id_regex": r"/auto/(?P<id>\d+)"})
    assert p.listing_site_id("https://x.example/auto/123-ford-focus") == "123"
    assert p.listing_site_id("https://x.example/auto/123?ref=search#photos") == "123"
    assert p.listing_site_id("https://x.example/login?next=/auto/123-ford-focus") is None
    assert p.listing_site_id("https://x.example/login?next=%2Fauto%2F123&lang=es") is None
    assert p.listing_site_id("https://x.example/login?return_to=https://x.example/auto/123") is None
    q = profile_from_dict({"name": "q", "start_urls": ["https://q.example/s"], "listing_links": "a::attr(href)",
                           "listing_id_regex": r"[?&]id=(\d+)"})
    assert q.listing_site_id("https://q.example/detail.php?id=77&lang=de") == "77"  # its own query counts
    assert q.listing_site_id("https://q.example/login?next=/detail.php?id=77") is None


def test_search_page_login_links_are_not_listings(profile):
    spider, stats = _spider(profile)
    links = ('<a class="listing-link" href="/listing/demo-0001.html">car</a>'
             '<a class="listing-link" href="/login?next=/listing/demo-0001.html">save</a>'
             '<a class="listing-link" href="/listing/demo-0001.html?from=top">same car</a>')
    requests = list(spider.parse_search(_page(links, f"{BASE}/search/page-1.html")))
    assert [r.url for r in requests] == [f"{BASE}/listing/demo-0001.html"]  # one request per listing
    got = stats.get_stats()
    assert got["carflow/search/link_without_id"] == 1 and got["carflow/search/duplicate_link"] == 1
    assert got["carflow/search/listing_links"] == 2


@pytest.mark.parametrize(
    ("raw", "site_currency", "expected"),
    [
        ("Ford Focus 1.6 Titanium 2010 – $ 4.500", None, (4500.0, "USD")),  # not the engine size or year
        ("Ford Focus 1.6 Titanium 2010 – $ 189.500", "MXN", (189500.0, "MXN")),  # "$" on a Mexican site
        ("VW Jetta 2.0 2015, 98.000 km – $ 245.000", "MXN", (245000.0, "MXN")),  # not the mileage
        ("12 345 €", "MXN", (12345.0, "EUR")),  # an unambiguous symbol keeps its currency
        ("£9,999", "MXN", (9999.0, "GBP")),  # MXN is no pound
        ("15 000 kr", "NOK", (15000.0, "NOK")),
        ("R$ 45.000,00", None, (45000.0, "BRL")),
        ("CHF 12'500.–", None, (12500.0, "CHF")),
        ("12’500 Fr.", None, (12500.0, "CHF")),
        ("12\u202f345 €", None, (12345.0, "EUR")),  # French narrow no-break space
        ("₹ 12,34,567", None, (1234567.0, "INR")),  # Indian grouping
        ("Golf 2017 1.4 TSI 150 hp", None, (None, None)),  # no currency, no single number: no price
        ("Golf 1.6 2010 12500", None, (12500.0, None)),
    ],
)
def test_price_from_a_title_and_the_site_currency(raw, site_currency, expected):
    assert parse_price(raw, site_currency) == expected


def test_profile_currency_field():
    base = {"name": "m", "start_urls": ["https://m.example/s"], "listing_links": "a::attr(href)",
            "listing_id_regex": r"/(\d+)"}
    assert profile_from_dict({**base, "currency": "mxn"}).currency == "MXN"
    assert profile_from_dict({**base, "default_currency": "EUR"}).currency == "EUR"  # the old name
    with pytest.raises(ProfileError, match="currency"):
        profile_from_dict({**base, "currency": "$$$"})
    item = ListingItem(listing_id="m:1", site="m", site_id="1", url="u", attributes={"price_raw": "$ 250.000"},
                       currency="$")
    normalise_listing(item, None, "MXN")
    assert (item.price, item.currency) == (250000.0, "MXN")
