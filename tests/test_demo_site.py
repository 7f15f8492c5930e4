"""The synthetic demo marketplace: determinism, planted problems, photo ground truth, HTML
structure and the HTTP server."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import struct
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageFile, ImageOps

from demo.generate import CATALOG, PHOTO_PROBLEMS, generate_site
from demo.server import DemoSite

NON_CAR = ("interior", "dashboard", "wheel", "text_banner")


# -- fixtures / helpers -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def site(tmp_path_factory) -> tuple[Path, dict[str, Any]]:
    """The default demo site (seed 0, 60 listings, 6 classes). Its generation time is not
    asserted here: a timed assertion on a shared CI machine only measures the neighbours."""
    out = tmp_path_factory.mktemp("demo-site")
    return out, generate_site(out, seed=0)


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _photos(gt: dict[str, Any]):
    for listing in gt["listings"]:
        for photo in listing["photos"]:
            yield listing, photo


def _clean_cars(gt: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for _, p in _photos(gt) if p["is_car"] and p["problem"] is None]


def _open(root: Path, url: str) -> Image.Image:
    return Image.open(root / url.lstrip("/"))


class _Page(HTMLParser):
    """Collects what a crawler would: links, img attributes, JSON-LD, dd texts, spans."""

    def __init__(self) -> None:
        super().__init__()
        self.links: list[dict[str, str]] = []
        self.imgs: list[dict[str, str]] = []
        self.jsonld: list[Any] = []
        self.texts: dict[str, str] = {}
        self._script = False
        self._capture: str | None = None
        self._buf: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "a":
            self.links.append(a)
        elif tag == "img":
            self.imgs.append(a)
        elif tag == "script" and a.get("type") == "application/ld+json":
            self._script, self._buf = True, []
        elif tag in ("dd", "span", "h1") and a.get("class"):
            self._capture, self._buf = f"{tag}.{a['class']}", []

    def handle_endtag(self, tag: str) -> None:
        if tag == "script" and self._script:
            self.jsonld.append(json.loads("".join(self._buf)))
            self._script = False
        elif self._capture and tag == self._capture.split(".")[0]:
            self.texts[self._capture] = "".join(self._buf)
            self._capture = None

    def handle_data(self, data: str) -> None:
        if self._script or self._capture:
            self._buf.append(data)


def _parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


def _img_url(attrs: dict[str, str]) -> str:
    """The photo URL of one gallery <img>: srcset's largest candidate, data-src, or src."""
    if attrs.get("srcset"):
        return attrs["srcset"].split(",")[-1].split()[0]
    if attrs.get("data-src"):
        return attrs["data-src"]
    return attrs["src"]


# -- determinism --------------------------------------------------------------------------------
def test_same_seed_is_byte_identical_and_other_seed_differs(site, tmp_path):
    root, gt = site
    again = tmp_path / "again"
    assert generate_site(again, seed=0) == gt
    assert _hashes(again) == _hashes(root)

    # regenerating in place with another seed leaves no stale file behind
    other = tmp_path / "other"
    shutil.copytree(root, other)
    gt1 = generate_site(other, seed=1, n_listings=16, n_classes=3)
    assert gt1["listings"] != gt["listings"][:16]
    fresh = tmp_path / "fresh"
    generate_site(fresh, seed=1, n_listings=16, n_classes=3)
    assert _hashes(other) == _hashes(fresh)
    assert set(_hashes(other).values()) != set(_hashes(root).values())


def test_parameters_are_validated(tmp_path):
    with pytest.raises(ValueError):
        generate_site(tmp_path, n_listings=5)
    with pytest.raises(ValueError):
        generate_site(tmp_path, n_classes=len(CATALOG) + 1)


# -- ground truth -------------------------------------------------------------------------------
def test_ground_truth_file_counts_and_labels(site):
    root, gt = site
    assert json.loads((root / "ground_truth.json").read_text()) == gt
    assert gt["seed"] == 0 and gt["site"] == "demo"
    assert len(gt["classes"]) == 6 and all(2 <= len(c["years"]) <= 3 for c in gt["classes"])
    counts = gt["counts"]
    refs = list(_photos(gt))
    assert counts["listings"] == len(gt["listings"]) == 60
    assert counts["photo_refs"] == len(refs)
    assert counts["unique_sha256"] == len({p["sha256"] for _, p in refs if p["sha256"]})
    assert counts["by_problem"] == dict(Counter(p["problem"] for _, p in refs if p["problem"]))
    assert counts["clean_car_refs"] / counts["photo_refs"] >= 0.7
    assert 250 <= counts["photo_refs"] <= 420

    class_keys = {f"{c['make']}_{c['model']}" for c in gt["classes"]}
    missing = [x for x in gt["listings"] if x["problem"] == "missing_label"]
    assert len(missing) == 1 and missing[0]["label"] is None and missing[0]["make_raw"] is None
    for x in gt["listings"]:
        assert x["listing_id"] == f"demo:{x['site_id']}" and x["url"] == f"/listing/{x['site_id']}.html"
        if x["problem"] is None:
            assert x["label"] == f"{x['make']}_{x['model']}_{x['year']}"
            assert f"{x['make']}_{x['model']}" in class_keys
            assert x["year"] in next(c["years"] for c in gt["classes"]
                                     if (c["make"], c["model"]) == (x["make"], x["model"]))
    raw_makes = {x["make_raw"] for x in gt["listings"] if x["make"] == "volkswagen"}
    assert {"VW", "Volkswagen", "  volkswagen "} <= raw_makes  # spellings that need normalising
    assert {"Mercedes", "Mercedes-Benz"} <= {x["make_raw"] for x in gt["listings"] if x["make"] == "mercedes-benz"}
    assert 0.5 <= sum(x["has_jsonld"] for x in gt["listings"]) / len(gt["listings"]) <= 0.95


def test_every_problem_is_planted_and_files_match_the_truth(site):
    root, gt = site
    refs = list(_photos(gt))
    by_problem = Counter(p["problem"] for _, p in refs)
    assert set(PHOTO_PROBLEMS) <= set(by_problem)
    for kind in NON_CAR:
        assert by_problem[kind] >= 3
        assert all(not p["is_car"] and p["bbox"] is None and p["kind"] == kind for _, p in refs if p["problem"] == kind)
    assert by_problem["exact_duplicate"] >= 3 and by_problem["near_duplicate"] >= 3

    for _, p in refs:
        path = root / p["url"].lstrip("/")
        if p["problem"] == "http_404":
            assert not path.exists() and p["sha256"] is None
            continue
        data = path.read_bytes()
        assert hashlib.sha256(data).hexdigest() == p["sha256"] and len(data) == p["size_bytes"]
        for alt in p["alt_urls"]:
            assert (root / alt.lstrip("/")).read_bytes() == data

    # the dealer banner: one URL, identical bytes, in at least 6 listings
    banners = [(x["site_id"], p) for x, p in refs if p["problem"] == "dealer_banner"]
    assert len({sid for sid, _ in banners}) >= 6
    assert len({p["sha256"] for _, p in banners}) == 1 and len({p["url"] for _, p in banners}) == 1

    # duplicates: the original (a clean car photo) is in another listing
    originals = {p["sha256"]: x["site_id"] for x, p in refs if p["problem"] is None and p["sha256"]}
    for x, p in refs:
        if p["problem"] == "exact_duplicate":
            assert p["sha256"] == p["duplicate_of"] and originals[p["duplicate_of"]] != x["site_id"]
        elif p["problem"] == "near_duplicate":
            assert p["sha256"] != p["duplicate_of"] and originals[p["duplicate_of"]] != x["site_id"]
            near = np.asarray(_open(root, p["url"]).convert("RGB").resize((32, 24)), np.float32)
            orig_url = p["duplicate_of_url"]
            orig = np.asarray(_open(root, orig_url).convert("RGB").resize((32, 24)), np.float32)
            assert np.abs(near - orig).mean() < 8  # same picture
        else:
            assert p["duplicate_of"] is None

    def one(problem: str) -> dict[str, Any]:
        return next(p for _, p in refs if p["problem"] == problem)

    assert one("empty")["size_bytes"] == 0
    assert (root / one("html_as_jpg")["url"].lstrip("/")).read_bytes().startswith(b"<!DOCTYPE html>")
    assert one("oversized")["size_bytes"] > 1_500_000
    assert _open(root, one("cmyk")["url"]).mode == "CMYK"
    assert _open(root, one("palette")["url"]).mode == "P"
    rgba = _open(root, one("rgba")["url"])
    assert rgba.mode == "RGBA" and np.asarray(rgba.getchannel("A")).min() == 0
    anim = _open(root, one("animated")["url"])
    assert anim.format == "GIF" and anim.n_frames == 2
    assert _open(root, one("tiny")["url"]).size == (24, 18)

    truncated = [p for _, p in refs if p["problem"] == "truncated"]
    assert {0.85, 0.4} <= {p["kept_fraction"] for p in truncated}
    for p in truncated:
        assert p["size_bytes"] == int(p["original_size_bytes"] * p["kept_fraction"])
        assert ImageFile.LOAD_TRUNCATED_IMAGES is False
        with pytest.raises(OSError):
            _open(root, p["url"]).load()


def test_car_bboxes_lie_inside_the_image_and_frame_the_car(site):
    root, gt = site
    cars = [p for _, p in _photos(gt) if p["is_car"]]
    assert cars
    for p in cars:
        x0, y0, x1, y1 = p["bbox"]
        assert 0 <= x0 < x1 <= p["width"] and 0 <= y0 < y1 <= p["height"], p
    for p in _clean_cars(gt)[::2]:
        img = _open(root, p["url"])
        assert img.size == (p["width"], p["height"])
        inside, outside = _contrast(np.asarray(img.convert("RGB"), np.float32), p["bbox"])
        assert inside > 3 * outside + 10, (p["url"], inside, outside)
        w = p["bbox"][2] - p["bbox"][0]
        assert 0.25 * p["width"] <= w <= 0.95 * p["width"]

    # the RGBA cut-out: the recorded bbox is where the (opaque) car is
    p = next(p for _, p in _photos(gt) if p["problem"] == "rgba")
    alpha = np.asarray(_open(root, p["url"]).getchannel("A"))
    ys, xs = np.nonzero(alpha > 100)  # the car; its shadow is only 90/255 opaque
    assert np.allclose([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], p["bbox"], atol=2)


def _contrast(a: np.ndarray, bbox: list[int]) -> tuple[float, float]:
    """Mean distance from each row's background colour (median outside the bbox), inside vs
    outside the bbox."""
    x0, y0, x1, y1 = bbox
    mask = np.zeros(a.shape[:2], bool)
    mask[y0:y1, x0:x1] = True
    outside = np.where(mask[..., None], np.nan, a)
    bg = np.nanmedian(outside, axis=1)
    dist = np.abs(a - bg[:, None, :]).mean(axis=2)
    return float(dist[mask].mean()), float(dist[~mask].mean())


def test_exif_rotated_photo_bbox_is_upright(site):
    root, gt = site
    p = next(p for _, p in _photos(gt) if p["problem"] == "exif_rotated")
    raw = _open(root, p["url"])
    assert raw.getexif().get(0x0112) == 6
    assert raw.size == (p["height"], p["width"]) == tuple(p["stored_size"])
    upright = ImageOps.exif_transpose(raw)
    assert upright.size == (p["width"], p["height"])
    inside, outside = _contrast(np.asarray(upright.convert("RGB"), np.float32), p["bbox"])
    assert inside > 3 * outside + 10


def test_bomb_declares_a_huge_size_in_a_tiny_file(site, monkeypatch):
    root, gt = site
    p = next(p for _, p in _photos(gt) if p["problem"] == "bomb")
    path = root / p["url"].lstrip("/")
    head = path.read_bytes()[:33]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    width, height = struct.unpack(">II", head[16:24])
    assert width * height > 100_000_000 and path.stat().st_size < 100_000
    assert (width, height) == (p["width"], p["height"])
    with pytest.raises(Image.DecompressionBombError):  # Pillow's default guard refuses it
        Image.open(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    t0 = time.perf_counter()
    with Image.open(path) as img:  # the header alone; nothing decoded
        assert img.size == (width, height)
    assert time.perf_counter() - t0 < 1.0


def test_clean_car_classes_have_a_learnable_look(site):
    """Nearest-centroid on colour histograms of 16x12 thumbnails of the car crops beats
    twice chance by far; on whole photos (background included) it still beats chance."""
    root, gt = site
    cars = _clean_cars(gt)
    labels = np.array([p["class_key"] for p in cars])
    classes = sorted(set(labels))
    assert len(classes) == 6
    train = np.arange(len(cars)) % 2 == 0

    def feature(img: Image.Image) -> np.ndarray:
        t = np.asarray(img.convert("RGB").resize((16, 12), Image.Resampling.BOX)) // 64
        idx = (t[..., 0] * 16 + t[..., 1] * 4 + t[..., 2]).ravel()
        return np.sqrt(np.bincount(idx, minlength=64) / idx.size)

    def accuracy(x: np.ndarray) -> float:
        centroids = np.stack([x[train & (labels == c)].mean(axis=0) for c in classes])
        pred = np.array(classes)[np.argmin(((x[~train, None] - centroids[None]) ** 2).sum(-1), axis=1)]
        return float((pred == labels[~train]).mean())

    crops = np.stack([feature(_open(root, p["url"]).crop(tuple(p["bbox"]))) for p in cars])
    whole = np.stack([feature(_open(root, p["url"])) for p in cars])
    chance = 1 / len(classes)
    assert accuracy(crops) > max(2 * chance, 0.7)
    assert accuracy(whole) > 1.5 * chance


# -- HTML -----------------------------------------------------------------------------------------
def test_pages_link_listings_photos_and_traps(site):
    root, gt = site
    assert (root / "robots.txt").read_text() == "User-agent: *\nDisallow: /private/\n"
    assert any(a.get("href") == "/search/page-1.html" for a in _parse(root / "index.html").links)

    # search pages: every listing once, a rel=next chain, the traps on page 1
    seen: list[str] = []
    page_url: str | None = "/search/page-1.html"
    pages = 0
    while page_url:
        page = _parse(root / page_url.lstrip("/"))
        pages += 1
        links = [a["href"] for a in page.links if a.get("class") == "listing-link"]
        if pages == 1:
            assert set(gt["private_urls"]) & set(links) and "http://offsite.invalid/listing/x.html" in links
            assert all((root / u.lstrip("/")).is_file() for u in gt["private_urls"])
        seen += [u for u in links if u.startswith("/listing/")]
        nxt = [a["href"] for a in page.links if a.get("class") == "next" and a.get("rel") == "next"]
        page_url = nxt[0] if nxt else None
    assert pages == 6 and seen == [x["url"] for x in gt["listings"]]

    styles: Counter[str] = Counter()
    ld_types: Counter[str] = Counter()
    brand_shapes: Counter[str] = Counter()
    for x in gt["listings"]:
        page = _parse(root / x["url"].lstrip("/"))
        assert page.texts["h1.title"] == x["title"]
        assert page.texts["span.price"].replace(" ", "").rstrip("€") == str(x["price"])
        if x["make_raw"]:
            assert page.texts["dd.make"] == x["make_raw"] and page.texts["dd.model"] == x["model_raw"]
            assert page.texts["dd.year"] == str(x["year"])
        else:
            assert not page.texts.get("dd.make") and "dd.model" not in page.texts
        gallery = [_img_url(a) for a in page.imgs]
        assert gallery == [p["url"] for p in x["photos"]]
        for a in page.imgs:
            styles["srcset" if a.get("srcset") else "data-src" if a.get("data-src") else "src"] += 1
            if a.get("srcset") or a.get("data-src"):
                assert a["src"].startswith("data:")
        assert len(page.jsonld) == int(x["has_jsonld"])
        if page.jsonld:
            doc = page.jsonld[0]
            ld_types[doc["@type"]] += 1
            brand = doc["brand"]
            brand_shapes[type(brand).__name__] += 1
            assert (brand["name"] if isinstance(brand, dict) else brand) == x["make_raw"]
            assert doc["model"] == x["model_raw"] and doc["vehicleModelDate"] == str(x["year"])
            assert float(doc["offers"]["price"]) == x["price"]
            images = doc["image"] if isinstance(doc["image"], list) else [doc["image"]]
            images = [i["contentUrl"] if isinstance(i, dict) else i for i in images]
            allowed = {u for p in x["photos"] for u in [p["url"], *p["alt_urls"]]}
            assert images and set(images) <= allowed and len(images) < len(x["photos"])
            for p in x["photos"]:
                for alt in p["alt_urls"]:
                    assert alt in images  # the CDN mirror is what the JSON-LD names
    assert min(styles.values()) >= 20 and set(styles) == {"src", "data-src", "srcset"}
    assert {"Car", "Vehicle", "Product"} <= set(ld_types)
    assert set(brand_shapes) == {"dict", "str"}
    assert sum(1 for _, p in _photos(gt) if p["alt_urls"]) >= 2


# -- the server ---------------------------------------------------------------------------------
def _get(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.headers["Content-Type"], r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], e.read()


def test_server_serves_files_with_types_404s_and_logs(site):
    root, gt = site
    listing = gt["listings"][0]
    photo = listing["photos"][0]
    one = {p["problem"]: p for _, p in _photos(gt) if p["problem"]}
    with DemoSite(root) as server:
        assert server.url.startswith("http://127.0.0.1:") and not server.url.endswith(":0")
        status, ctype, body = _get(server.url + "/robots.txt")
        assert status == 200 and ctype.startswith("text/plain") and b"Disallow: /private/" in body
        status, ctype, body = _get(server.url + listing["url"])
        assert status == 200 and ctype.startswith("text/html") and b'class="gallery"' in body
        status, ctype, body = _get(server.url + photo["url"] + "?v=1")
        assert (status, ctype) == (200, "image/jpeg") and hashlib.sha256(body).hexdigest() == photo["sha256"]
        assert _get(server.url + one["html_as_jpg"]["url"])[:2] == (200, "image/jpeg")
        assert _get(server.url + one["palette"]["url"])[:2] == (200, "image/png")
        assert _get(server.url + one["animated"]["url"])[:2] == (200, "image/gif")
        assert _get(server.url + one["empty"]["url"])[::2] == (200, b"")
        assert _get(server.url + one["http_404"]["url"])[0] == 404
        assert _get(server.url + "/%2e%2e/%2e%2e/etc/passwd")[0] == 404
        assert server.requests_log[:4] == ["/robots.txt", listing["url"], photo["url"] + "?v=1", one["html_as_jpg"]["url"]]

        # many concurrent clients
        urls = [server.url + p["url"] for _, p in list(_photos(gt))[:60] if p["sha256"]]
        results: list[int] = []
        lock = threading.Lock()

        def fetch(u: str) -> None:
            code = _get(u)[0]
            with lock:
                results.append(code)

        threads = [threading.Thread(target=fetch, args=(u,)) for u in urls]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        assert results == [200] * len(urls)
    with pytest.raises(OSError):
        urllib.request.urlopen(server.url + "/robots.txt", timeout=2)


def test_server_keep_alive_and_latency(site):
    import http.client

    root, _ = site
    with DemoSite(root, latency_ms=40) as server:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        t0 = time.perf_counter()
        for _ in range(3):  # three requests on one keep-alive connection
            conn.request("GET", "/robots.txt")
            resp = conn.getresponse()
            assert resp.status == 200 and resp.read().startswith(b"User-agent")
        elapsed = time.perf_counter() - t0
        conn.close()
        assert 0.12 <= elapsed < 2.0
        assert server.requests_log == ["/robots.txt"] * 3


def test_small_sites_still_plant_everything(tmp_path):
    gt = generate_site(tmp_path, seed=7, n_listings=8, n_classes=1, image_size=(160, 120), listings_per_page=3)
    problems = {p["problem"] for _, p in _photos(gt)}
    assert set(PHOTO_PROBLEMS) <= problems
    assert len(list((tmp_path / "search").glob("page-*.html"))) == 3
    cars = [p for _, p in _photos(gt) if p["is_car"] and p["problem"] is None]
    assert all(p["width"] == 160 and p["height"] == 120 for p in cars)
    img = Image.open(io.BytesIO((tmp_path / cars[0]["url"].lstrip("/")).read_bytes()))
    assert img.size == (160, 120)


def test_new_listings_extend_the_site_and_keep_every_earlier_photo(tmp_path):
    """The nightly's "10% more listings": the extended site has the same listings, photos
    and bytes as before, plus the new listings at the end (their own photos only)."""
    from demo.generate import generate_site

    old = generate_site(tmp_path / "old", seed=0, n_listings=20, n_classes=3)
    new = generate_site(tmp_path / "new", seed=0, n_listings=20, n_classes=3, new_listings=2)
    assert [x["listing_id"] for x in new["listings"][:20]] == [x["listing_id"] for x in old["listings"]]
    assert new["listings"][:20] == old["listings"]
    assert len(new["listings"]) == 22 and new["params"]["new_listings"] == 2
    for x in new["listings"][20:]:
        assert x["problem"] is None and x["label"] and 3 <= len(x["photos"]) <= 6
        assert all(p["is_car"] and p["problem"] is None for p in x["photos"])
    old_files = {p.relative_to(tmp_path / "old") for p in (tmp_path / "old").rglob("*") if p.is_file()}
    for rel in old_files:
        if rel.parts[0] in ("img", "cdn", "listing", "private"):
            assert (tmp_path / "new" / rel).read_bytes() == (tmp_path / "old" / rel).read_bytes(), rel
    new_shas = {p["sha256"] for x in new["listings"][20:] for p in x["photos"]}
    old_shas = {p["sha256"] for x in old["listings"] for p in x["photos"] if p["sha256"]}
    assert new_shas and not new_shas & old_shas
