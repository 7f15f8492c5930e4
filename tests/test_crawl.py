"""End-to-end crawls of the demo marketplace: each crawl is a real ``scrapy crawl``
subprocess over HTTP on loopback, into a local folder and into S3 (moto server)."""

from __future__ import annotations

import json
import signal
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlparse

import pytest

from carflow.storage import open_storage
from demo.truth import CRAWL_REJECTED, expected_ingest, load_ground_truth
from spiders.run import read_stats, run_crawl, start_crawl

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]

#: loopback: no need for politeness delays in tests (the defaults stay polite)
FAST = {"AUTOTHROTTLE_ENABLED": False, "DOWNLOAD_DELAY": 0, "CONCURRENT_REQUESTS_PER_DOMAIN": 8}


def _path(entry) -> str:
    """The URL path of one request-log entry (a path/URL string, a dict or a tuple)."""
    if isinstance(entry, dict):
        entry = entry.get("path") or entry.get("url") or ""
    elif isinstance(entry, (tuple, list)):
        entry = next((x for x in entry if isinstance(x, str) and x.startswith(("/", "http"))), "")
    elif not isinstance(entry, str):
        entry = getattr(entry, "path", None) or getattr(entry, "url", "") or ""
    return urlparse(entry).path if "://" in entry else entry.split("?", 1)[0]


def _paths(site, start: int = 0) -> list[str]:
    return [_path(e) for e in list(site.requests_log)[start:]]


def _records(store, crawl_id: str | None = None) -> list[dict]:
    prefix = f"listings/demo/{crawl_id}/" if crawl_id else "listings/demo/"
    out = []
    for key in store.list(prefix):
        out += [json.loads(line) for line in store.get_text(key).splitlines() if line.strip()]
    return out


def _pairs(records) -> set[tuple[str, str]]:
    return {(r["listing_id"], img["image_id"]) for r in records for img in r["images"] if img["image_id"]}


def _photo_paths(photo: dict) -> set[str]:
    return {_path(u) for u in [photo["url"], *(photo.get("alt_urls") or [])]}


def test_crawl_stores_exactly_the_good_photos_and_recrawl_fetches_nothing(demo_site, demo_site_dir, storage_uri):
    gt = load_ground_truth(demo_site_dir)
    expected = expected_ingest(gt)
    store = open_storage(storage_uri)
    log_start = len(demo_site.requests_log)

    stats = run_crawl("demo", storage_uri, overrides=FAST, base_url=demo_site.url, timeout=120)
    first_paths = _paths(demo_site, log_start)

    # photos: every good photo stored under its sha256, nothing else stored
    stored = {key.rsplit("/", 1)[-1] for key in store.list("raw/")}
    assert stored == expected["image_ids"]
    for image_id in list(stored)[:3]:
        assert open_storage(storage_uri).get_image(image_id)  # readable, bytes as served

    # listings: one record each, ids and labels as in the ground truth
    records = _records(store, stats["crawl_id"])
    assert len(records) == len(gt["listings"]) == stats["carflow/listing/new"]
    by_id = {r["listing_id"]: r for r in records}
    assert set(by_id) == {x["listing_id"] for x in gt["listings"]}
    for truth in gt["listings"]:
        assert by_id[truth["listing_id"]]["label"] == truth["label"], truth["listing_id"]
    assert stats.get("carflow/listing/missing_label", 0) == sum(1 for x in gt["listings"] if not x["label"])
    assert _pairs(records) == expected["pairs"]

    # rejected photos: the right reason in the item and in the stats, never stored
    for truth in gt["listings"]:
        rec = by_id[truth["listing_id"]]
        for photo in truth["photos"]:
            matches = [img for img in rec["images"] if _path(img["url"]) in _photo_paths(photo)]
            assert matches, (truth["listing_id"], photo["url"])
            reason = CRAWL_REJECTED.get(photo.get("problem"))
            if reason:
                assert {(m["status"], m["reason"], m["image_id"]) for m in matches} == {("rejected", reason, None)}
            else:
                assert {m["image_id"] for m in matches} == {photo["sha256"]}
    rejected = {k.split("/", 2)[-1]: v for k, v in stats.items() if k.startswith("carflow/photo_rejected/")}
    assert rejected == expected["rejected_by_reason"]
    assert stats["carflow/photo/stored"] == len(expected["image_ids"])

    # politeness: robots.txt read first and obeyed, nothing off-domain, photos capped
    assert first_paths[0] == "/robots.txt"
    assert not any(p.startswith("/private/") for p in first_paths)
    for url in gt.get("private_urls", []):
        assert _path(url) not in first_paths
    assert stats.get("robotstxt/forbidden", 0) >= 1
    assert not any("offsite.invalid" in k for k in stats)  # never resolved, never fetched
    assert not any(k.startswith("carflow/listing/failed/download_error") for k in stats)
    # each listing page fetched once; a photo URL at most once per crawl
    listing_paths = Counter(p for p in first_paths if p.startswith("/listing/"))
    assert len(listing_paths) == len(gt["listings"]) and set(listing_paths.values()) == {1}
    photo_paths = Counter(p for p in first_paths if p.startswith(("/img/", "/cdn/")))
    assert max(photo_paths.values()) == 1
    assert store.exists(f"crawls/demo/{stats['crawl_id']}/stats.json")

    # incremental re-crawl into the same storage: no listing page, no photo requested
    log_start = len(demo_site.requests_log)
    again = run_crawl("demo", storage_uri, overrides=FAST, base_url=demo_site.url, timeout=120)
    second_paths = _paths(demo_site, log_start)
    assert not [p for p in second_paths if p.startswith(("/listing/", "/img/", "/cdn/", "/private/"))]
    assert any(p.startswith("/search/") for p in second_paths)
    assert again.get("carflow/listing/new", 0) == 0 and again.get("carflow/photo/downloaded", 0) == 0
    assert again["carflow/listing/known_skipped"] == len(gt["listings"])
    assert again["carflow/known/listings"] == len(gt["listings"])
    assert {key.rsplit("/", 1)[-1] for key in store.list("raw/")} == expected["image_ids"]
    assert not list(store.list(f"listings/demo/{again['crawl_id']}/"))  # nothing new: no feed part


def test_interrupted_crawl_resumes_with_the_same_result(demo_site_dir, tmp_path):
    from demo.server import DemoSite

    reference_store = str(tmp_path / "reference")
    resumed_store = str(tmp_path / "resumed")
    jobdir = tmp_path / "job"
    slow = {**FAST, "CONCURRENT_REQUESTS_PER_DOMAIN": 2, "CARFLOW_FEED_PART_SIZE": 3}
    with DemoSite(demo_site_dir, latency_ms=30) as site:
        reference = run_crawl("demo", reference_store, overrides=FAST, base_url=site.url, timeout=120)

        log_start = len(site.requests_log)
        proc, crawl_id = start_crawl("demo", resumed_store, jobdir, None, slow, base_url=site.url)
        try:
            deadline = time.monotonic() + 60
            while sum(p.startswith("/listing/") for p in _paths(site, log_start)) < 6:
                assert proc.poll() is None, open(proc.log_path).read()[-3000:]
                assert time.monotonic() < deadline, "the crawl made no progress"
                time.sleep(0.05)
            proc.send_signal(signal.SIGINT)  # a graceful stop: in-flight work finishes, state is saved
            assert proc.wait(60) == 0, open(proc.log_path).read()[-3000:]
        finally:
            if proc.poll() is None:
                proc.kill()
        first = read_stats("demo", crawl_id, resumed_store)
        assert first["finish_reason"] == "shutdown"
        store = open_storage(resumed_store)
        done = {r["listing_id"] for r in _records(store, crawl_id)}
        gt = load_ground_truth(demo_site_dir)
        assert 0 < len(done) < len(gt["listings"])
        assert (jobdir / "spider.state").exists()
        first_run_paths = _paths(site, log_start)

        log_start = len(site.requests_log)
        resumed = run_crawl("demo", resumed_store, jobdir, overrides=slow, base_url=site.url, timeout=120)
        second_run_paths = _paths(site, log_start)

    assert resumed["crawl_id"] == crawl_id  # kept in spider.state
    assert resumed["carflow/resumed"] == 1 and resumed["carflow/sessions"] == 2
    records = _records(store, crawl_id)
    assert len({r["listing_id"] for r in records}) == len(records) == len(gt["listings"])
    assert _pairs(records) == _pairs(_records(open_storage(reference_store), reference["crawl_id"]))
    assert _pairs(records) == expected_ingest(gt)["pairs"]
    # the resumed run fetched none of the listing pages the first run recorded
    first_listings = {p for p in first_run_paths if p.startswith("/listing/")}
    assert not first_listings & {p for p in second_run_paths if p.startswith("/listing/")}
    assert {_path(r["url"]) for r in records} == first_listings | {p for p in second_run_paths if p.startswith("/listing/")}
    # totals over both runs
    assert resumed["carflow/listing/new"] == len(gt["listings"])
    assert {k: v for k, v in resumed.items() if k.startswith("carflow/photo_rejected/")} == {
        f"carflow/photo_rejected/{k}": v for k, v in expected_ingest(gt)["rejected_by_reason"].items()
    }


def test_killed_crawl_resumes_with_the_same_result_and_downloads_nothing_twice(demo_site_dir, tmp_path):
    """SIGKILL (out of memory, eviction) gives the crawl no chance to flush its feed or
    save ``spider.state``: the journal in its JOBDIR must carry it."""
    from demo.server import DemoSite

    store_uri = str(tmp_path / "store")
    jobdir = tmp_path / "job"
    gt = load_ground_truth(demo_site_dir)
    slow = {**FAST, "CONCURRENT_REQUESTS_PER_DOMAIN": 2, "CARFLOW_FEED_PART_SIZE": 4}
    raw = tmp_path / "store" / "raw"
    with DemoSite(demo_site_dir, latency_ms=30) as site:
        log_start = len(site.requests_log)
        proc, crawl_id = start_crawl("demo", store_uri, jobdir, None, slow, base_url=site.url)
        try:
            deadline = time.monotonic() + 90
            # mid-crawl: some photos stored, most listings still to do
            while sum(1 for _ in raw.glob("*/*")) < 20 if raw.exists() else True:
                assert proc.poll() is None, open(proc.log_path).read()[-3000:]
                assert time.monotonic() < deadline, "the crawl made no progress"
                time.sleep(0.02)
            proc.send_signal(signal.SIGKILL)  # no shutdown: nothing is flushed or saved
            assert proc.wait(30) == -signal.SIGKILL
        finally:
            if proc.poll() is None:
                proc.kill()
        first_paths = _paths(site, log_start)
        store = open_storage(store_uri)
        stored_after_kill = {key.rsplit("/", 1)[-1] for key in store.list("raw/")}
        assert not store.exists(f"crawls/demo/{crawl_id}/stats.json")  # it never closed
        assert not (jobdir / "spider.state").exists()
        assert len(_records(store, crawl_id)) < len(gt["listings"])

        log_start = len(site.requests_log)
        resumed = run_crawl("demo", store_uri, jobdir, overrides=slow, base_url=site.url, timeout=120)
        second_paths = set(_paths(site, log_start))

    assert resumed["crawl_id"] == crawl_id  # kept in the journal from the start
    assert resumed["finish_reason"] == "finished"
    records = _records(store, crawl_id)
    assert len({r["listing_id"] for r in records}) == len(records) == len(gt["listings"])
    assert _pairs(records) == expected_ingest(gt)["pairs"]  # what an uninterrupted crawl stores
    assert {key.rsplit("/", 1)[-1] for key in store.list("raw/")} == expected_ingest(gt)["image_ids"]

    # nothing downloaded twice. A photo request means its listing page was parsed: that
    # page is never requested again. A photo stored from its URL is never requested again.
    first = set(first_paths)
    sha_of, urls_of_sha, listing_of = {}, Counter(), {}
    for truth in gt["listings"]:
        for photo in truth["photos"]:
            for path in _photo_paths(photo):
                sha_of[path], listing_of[path] = photo.get("sha256"), _path(truth["url"])
    urls_of_sha.update(sha_of[p] for p in first if p in sha_of)
    parsed_first = {listing_of[p] for p in first if p in listing_of}
    assert parsed_first and len(parsed_first) < len(gt["listings"])
    assert not parsed_first & second_paths, sorted(parsed_first & second_paths)
    stored_from = {p for p in first if p in sha_of and sha_of[p] in stored_after_kill and urls_of_sha[sha_of[p]] == 1}
    assert stored_from and not stored_from & second_paths, sorted(stored_from & second_paths)
    assert resumed.get("carflow/recovered/feed_parts", 0) + resumed.get("carflow/recovered/listings", 0) >= 1
    assert not (jobdir / "carflow" / "scraped.jsonl").exists()  # a clean close drops the journal


def test_crawl_that_reaches_nothing_fails_with_a_message(demo_site, tmp_path):
    from conftest import free_port

    from spiders.run import CrawlFailed

    with pytest.raises(CrawlFailed, match="reached none of its search pages") as info:
        run_crawl("demo", str(tmp_path / "a"), overrides={**FAST, "RETRY_TIMES": 0},
                  base_url=f"http://127.0.0.1:{free_port()}", timeout=120)
    assert "\n" not in str(info.value)

    profile = tmp_path / "wrong.yaml"
    profile.write_text((ROOT / "spiders" / "profiles" / "demo.yaml").read_text()
                       .replace("a.listing-link::attr(href)", "a.no-such-link::attr(href)"))
    with pytest.raises(CrawlFailed, match=r"found 0 listings on \d+ search page") as info:
        run_crawl(str(profile), str(tmp_path / "b"), overrides=FAST, base_url=demo_site.url, timeout=120)
    assert "listing_links" in str(info.value)
