"""Crawl throughput: our Scrapy spider vs. a naive one-request-at-a-time ``requests`` loop.

Generates a demo marketplace, serves it on loopback with a per-request latency (a
stand-in for the network), then in one run measures pages/s and photos/s of

(a) ``scrapy crawl listings`` (a subprocess, as in production) with politeness relaxed
    for loopback (no AutoThrottle, no delay, higher concurrency) into a temp local storage;
(b) a naive loop: fetch each search page, each listing page and each photo one by one
    (``requests.Session``, keep-alive), hash + store every photo in a temp folder.

    python bench/crawl.py [--listings 200] [--classes 6] [--latency-ms 30] [--concurrency 32]

Prints both and their ratio (target: the spider ≥ 5× the naive loop).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urljoin

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def naive_crawl(base_url: str, out_dir: Path, max_listings: int | None = None) -> dict:
    """Search pages → listing pages → photos, strictly one request at a time."""
    import hashlib

    import requests
    from parsel import Selector

    from spiders.profile import load_profile
    from spiders.spiders.listings import element_image_url, find_vehicle_node, jsonld_fields

    profile = load_profile("demo")
    session = requests.Session()
    session.headers["User-Agent"] = "carflow-bench-naive/0.1"
    pages = photos = listings = 0
    photo_bytes = 0
    seen_photos: set[str] = set()
    url = urljoin(base_url + "/", "search/page-1.html")
    t0 = time.perf_counter()
    while url and (max_listings is None or listings < max_listings):
        r = session.get(url, timeout=30)
        pages += 1
        sel = Selector(text=r.text)
        links = sel.css(profile.listing_links).getall()
        nxt = sel.css(profile.pagination).get() if profile.pagination else None
        for href in links:
            link = urljoin(url, href)
            if "/private/" in link or not link.startswith(base_url):
                continue  # what robots.txt / allowed_domains do for the spider
            if max_listings is not None and listings >= max_listings:
                break
            lr = session.get(link, timeout=30)
            pages += 1
            listings += 1
            if lr.status_code != 200:
                continue
            ls = Selector(text=lr.text)
            docs = []
            for raw in ls.xpath('//script[@type="application/ld+json"]/text()').getall():
                try:
                    docs.append(json.loads(raw))
                except ValueError:
                    pass
            ld = jsonld_fields(find_vehicle_node(docs))
            urls = [element_image_url(dict(el.attrib), profile.image_attributes)
                    for el in ls.css(profile.fields.images or "img")]
            urls += ld.get("images", [])
            for photo_url in dict.fromkeys(urljoin(link, u) for u in urls if u):
                if photo_url in seen_photos:
                    continue
                seen_photos.add(photo_url)
                pr = session.get(photo_url, timeout=30)
                photos += 1
                if pr.status_code == 200 and pr.content:
                    digest = hashlib.sha256(pr.content).hexdigest()
                    path = out_dir / digest[:2] / digest
                    if not path.exists():
                        path.parent.mkdir(parents=True, exist_ok=True)
                        path.write_bytes(pr.content)
                    photo_bytes += len(pr.content)
        url = urljoin(url, nxt) if nxt else None
    elapsed = time.perf_counter() - t0
    return {"pages": pages, "photos": photos, "listings": listings, "elapsed_s": elapsed, "bytes": photo_bytes}


def spider_crawl(base_url: str, storage: str, concurrency: int, max_listings: int | None = None) -> dict:
    from spiders.run import run_crawl

    overrides = {
        "AUTOTHROTTLE_ENABLED": False,
        "DOWNLOAD_DELAY": 0,
        "CONCURRENT_REQUESTS": concurrency * 2,
        "CONCURRENT_REQUESTS_PER_DOMAIN": concurrency,
        "LOG_LEVEL": "WARNING",
    }
    t0 = time.perf_counter()
    stats = run_crawl("demo", storage, overrides=overrides, max_listings=max_listings, base_url=base_url,
                      timeout=1800)
    wall = time.perf_counter() - t0
    listing_pages = sum(v for k, v in stats.items() if k == "carflow/listing/new" or k.startswith("carflow/listing/failed/http"))
    pages = stats.get("carflow/search/pages", 0) + listing_pages
    return {
        "pages": pages,
        "photos": stats.get("carflow/photo/downloaded", 0),
        "listings": stats.get("carflow/listing/new", 0),
        "elapsed_s": float(stats.get("elapsed_time_seconds") or wall),  # crawl time, in-process
        "wall_s": wall,  # including the subprocess start (~1-2 s)
        "stored": stats.get("carflow/photo/stored", 0),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--listings", type=int, default=200)
    parser.add_argument("--classes", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--latency-ms", type=float, default=30.0, help="per-request latency of the demo server")
    parser.add_argument("--concurrency", type=int, default=32, help="spider CONCURRENT_REQUESTS_PER_DOMAIN")
    parser.add_argument("--naive-listings", type=int, default=None,
                        help="time the naive loop on the first N listings only (rates are per second anyway)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    a = parser.parse_args(argv)

    from demo.generate import generate_site
    from demo.server import DemoSite

    with tempfile.TemporaryDirectory(prefix="carflow-bench-") as tmp:
        tmp_path = Path(tmp)
        t0 = time.perf_counter()
        generate_site(tmp_path / "site", seed=a.seed, n_listings=a.listings, n_classes=a.classes)
        gen_s = time.perf_counter() - t0
        with DemoSite(tmp_path / "site", latency_ms=a.latency_ms) as site:
            spider = spider_crawl(site.url, str(tmp_path / "store-spider"), a.concurrency)
            naive = naive_crawl(site.url, tmp_path / "store-naive", a.naive_listings)

    def rates(r: dict) -> dict:
        return {**r, "pages_per_s": r["pages"] / r["elapsed_s"], "photos_per_s": r["photos"] / r["elapsed_s"]}

    spider, naive = rates(spider), rates(naive)
    result = {
        "listings": a.listings,
        "latency_ms": a.latency_ms,
        "concurrency": a.concurrency,
        "generate_s": round(gen_s, 2),
        "spider": spider,
        "naive": naive,
        "speedup_pages": spider["pages_per_s"] / naive["pages_per_s"],
        "speedup_photos": spider["photos_per_s"] / naive["photos_per_s"],
    }
    if a.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"demo site: {a.listings} listings, {a.latency_ms:g} ms latency per request (generated in {gen_s:.1f}s)")
        print(f"{'':8} {'pages':>6} {'photos':>7} {'time s':>7} {'pages/s':>8} {'photos/s':>9}")
        for name, r in (("spider", spider), ("naive", naive)):
            print(f"{name:8} {r['pages']:>6} {r['photos']:>7} {r['elapsed_s']:>7.2f} "
                  f"{r['pages_per_s']:>8.1f} {r['photos_per_s']:>9.1f}")
        wall_ratio = (spider["pages"] + spider["photos"]) / spider["wall_s"] / (
            (naive["pages"] + naive["photos"]) / naive["elapsed_s"])
        print(f"spider wall time incl. process start and exit: {spider['wall_s']:.2f}s "
              f"(requests/s speed-up on wall time: {wall_ratio:.1f}x)")
        print(f"speed-up: pages {result['speedup_pages']:.1f}x, photos {result['speedup_photos']:.1f}x (target >= 5x)")
    return result


if __name__ == "__main__":
    main()
