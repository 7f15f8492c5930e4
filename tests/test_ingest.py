"""Ingest: listing records → manifest v0; seed-style folder datasets → the same manifest."""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest
from PIL import Image

from carflow.manifest import INGEST_SCHEMA, read_manifest
from carflow.storage import LocalStorage, open_storage
from tasks.ingest import (
    build_manifest,
    parse_folder_key,
    read_listing_records,
    write_listing_records,
)

ROOT = Path(__file__).resolve().parents[1]


def _jpeg(seed: int, size=(96, 72)) -> bytes:
    img = Image.new("RGB", size, ((seed * 40) % 256, (seed * 90) % 256, (seed * 150) % 256))
    img.putpixel((seed % size[0], 0), (255, 255, 255))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def _img(i: int, **kw) -> dict:
    d = {"url": f"http://s/{i}.jpg", "image_id": f"{i:064x}", "status": "stored", "reason": None,
         "bytes": 100 + i, "content_type": "image/jpeg"}
    d.update(kw)
    return d


def _listing(lid: str, images: list[dict], **kw) -> dict:
    rec = {"listing_id": f"demo:{lid}", "site": "demo", "site_id": lid, "make": "volkswagen", "model": "golf",
           "year": 2017, "label": "volkswagen_golf_2017", "make_raw": "VW", "model_raw": "Golf",
           "images": images, "crawl_id": "c1", "crawled_at": "2026-11-21T10:00:00+00:00"}
    rec.update(kw)
    return rec


def test_build_manifest_rows_rejects_and_labels():
    records = [
        _listing("a", [_img(1), _img(2), _img(1, url="http://s/alt-1.jpg"),  # same bytes twice in a listing
                       _img(0, image_id=None, status="rejected", reason="http_404")]),
        _listing("b", [_img(1, status="known"), _img(3)]),  # same photo in another listing
        _listing("c", [_img(4)], make=None, model=None, label=None, year=None),
    ]
    manifest, rejects, stats = build_manifest(records)
    assert manifest.schema.equals(INGEST_SCHEMA, check_metadata=False)
    pairs = sorted(zip(manifest.column("listing_id").to_pylist(), manifest.column("image_id").to_pylist()))
    assert pairs == sorted([("demo:a", f"{1:064x}"), ("demo:a", f"{2:064x}"), ("demo:b", f"{1:064x}"),
                            ("demo:b", f"{3:064x}"), ("demo:c", f"{4:064x}")])
    assert stats["images"] == 4 and stats["rows"] == 5 and stats["listing_missing_label"] == 1
    assert rejects.to_pylist()[0]["reason"] == "http_404"
    assert set(manifest.column("status").to_pylist()) == {"kept"}
    labels = dict(zip(manifest.column("listing_id").to_pylist(), manifest.column("label").to_pylist()))
    assert labels["demo:c"] is None and labels["demo:a"] == "volkswagen_golf_2017"
    assert manifest.column("raw_key").to_pylist()[0].startswith("raw/")


def test_latest_record_wins_and_bad_lines_are_counted(tmp_path):
    store = LocalStorage(tmp_path)
    write_listing_records(store, "demo", "c1", [_listing("a", [_img(1)])])
    newer = _listing("a", [_img(1), _img(2)], crawled_at="2026-11-22T10:00:00+00:00")
    write_listing_records(store, "demo", "c2", [newer])
    store.put_text("listings/demo/c3/part-00000.jsonl", '{"broken json\n{"no_listing_id": 1}\n')
    records, stats = read_listing_records(store)
    assert len(records) == 1 and len(records[0]["images"]) == 2
    assert stats["bad_feed_line"] == 2


@pytest.mark.parametrize(
    ("key", "listing", "photo", "label"),
    [
        ("ford_ranger_2017/L123_2_9f8e.jpg", "import:L123", 2, "ford_ranger_2017"),
        ("mercedes-benz_v_2016/88_0_ab.jpg", "import:88", 0, "mercedes-benz_v_2016"),
        ("VW_Golf/77_1_x.jpg", "import:77", 1, "volkswagen_golf"),
        ("ford_ranger_2017/nounderscore.jpg", "import:nounderscore", None, "ford_ranger_2017"),
    ],
)
def test_parse_folder_key(key, listing, photo, label):
    from carflow.settings import load_settings

    cfg = load_settings().ingest
    info = parse_folder_key(key, "import", cfg.listing_regex, cfg.label_regex)
    assert (info["listing_id"], info["photo"], info["label"]) == (listing, photo, label)


def _make_folder_dataset(store) -> dict[str, bytes]:
    files = {
        "ford_ranger_2017/L1_0_aaa.jpg": _jpeg(1),
        "ford_ranger_2017/L1_1_bbb.jpg": _jpeg(2),
        "ford_ranger_2017/L2_0_ccc.jpg": _jpeg(3),
        "vw_golf_2016/L3_0_ddd.jpg": _jpeg(1),  # same bytes as L1_0 in another listing
        "vw_golf_2016/L3_1_eee.jpg": b"",  # 0-byte file
        "vw_golf_2016/notes.txt": b"not a photo",
        "vw_golf_2016/L4_0_fff.jfif": _jpeg(4),  # a JPEG by content, whatever its name
        "vw_golf_2016/L4_1_ggg": _jpeg(5),  # no extension
        "vw_golf_2016/L5_0_hhh.jpg": b"<html>gone</html>",  # named .jpg: kept for clean to judge
        "ford_ranger_2018/L1_2_iii.jpg": _jpeg(6),  # listing L1 again, in another class folder
        "README.md": b"# my dataset",  # not in a class folder
    }
    for key, data in files.items():
        store.put(key, data)
    return files


@pytest.mark.integration
def test_folder_import_flow_local_and_s3(storage_uri, tmp_path, prefect_server):
    from flows.ingest import ingest

    source_uri = storage_uri.rstrip("/") + "-src" if storage_uri.startswith("s3://") else str(tmp_path / "src")
    files = _make_folder_dataset(open_storage(source_uri))
    dest_uri = str(tmp_path / "dest")
    summary = ingest(storage=dest_uri, folders=source_uri, site="seed")
    dest = open_storage(dest_uri)
    manifest = read_manifest(dest, "manifests/ingest/manifest.parquet", INGEST_SCHEMA).to_pylist()
    got = sorted((r["listing_id"], r["image_id"], r["label"], r["photo_index"]) for r in manifest)
    assert got == sorted([
        ("seed:L1", _sha(files["ford_ranger_2017/L1_0_aaa.jpg"]), "ford_ranger_2017", 0),
        ("seed:L1", _sha(files["ford_ranger_2017/L1_1_bbb.jpg"]), "ford_ranger_2017", 1),
        ("seed:L1", _sha(files["ford_ranger_2018/L1_2_iii.jpg"]), "ford_ranger_2018", 2),  # its own folder
        ("seed:L2", _sha(files["ford_ranger_2017/L2_0_ccc.jpg"]), "ford_ranger_2017", 0),
        ("seed:L3", _sha(files["vw_golf_2016/L3_0_ddd.jpg"]), "volkswagen_golf_2016", 0),
        ("seed:L4", _sha(files["vw_golf_2016/L4_0_fff.jfif"]), "volkswagen_golf_2016", 0),
        ("seed:L4", _sha(files["vw_golf_2016/L4_1_ggg"]), "volkswagen_golf_2016", 1),
        ("seed:L5", _sha(files["vw_golf_2016/L5_0_hhh.jpg"]), "volkswagen_golf_2016", 0),
    ])
    assert summary["images"] == 7 and summary["listings"] == 5
    assert summary["rejected_by_reason"] == {"empty": 1}
    assert summary["skipped"] == {"skipped_not_image": 1, "skipped_not_in_class_folder": 1}
    assert summary["label_conflict_listings"] == 1
    for image_id in {r["image_id"] for r in manifest}:
        assert _sha(dest.get_image(image_id)) == image_id
    raw_before = list(dest.list("raw/"))
    again = ingest(storage=dest_uri, folders=source_uri, site="seed")  # idempotent
    assert list(dest.list("raw/")) == raw_before
    assert (again["rows"], again["images"]) == (summary["rows"], summary["images"])


@pytest.mark.integration
def test_cli_ingest_folders(tmp_path, prefect_server):
    from prefect.settings import PREFECT_API_URL

    src = tmp_path / "src"
    files = _make_folder_dataset(LocalStorage(src))
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", "ingest", str(src), "--layout", "folders",
         "--storage", str(tmp_path / "dest")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert out["images"] == len({_sha(b) for k, b in files.items() if b and "/" in k and not k.endswith(".txt")})
    # every skip is printed (through the flow's log), not only the photos imported
    printed = proc.stdout + proc.stderr
    assert "1 skipped (not_image)" in printed and "1 skipped (not_in_class_folder)" in printed
    assert "1 listing(s) found in two class folders" in printed
    assert Path(out["manifest"].removeprefix("file://")).is_file()


def test_entry_points_start_no_telemetry(tmp_path):
    """A flow entry point imports `flows` before Prefect, so the temporary server it
    starts has the telemetry heartbeat off (it raced the fresh SQLite database:
    "database is locked")."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_SERVER_ANALYTICS")}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    code = (
        "import flows.ingest\n"
        "from prefect.settings import get_current_settings\n"
        "print(get_current_settings().server.analytics_enabled)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "False"


def test_streamed_manifest_equals_the_records_manifest(tmp_path):
    """build_manifest_from_feeds (two passes, Arrow batches) = build_manifest over
    read_listing_records: same rows, same order, same counts; a listing seen in two
    crawls takes the later record and the earlier crawl time."""
    from tasks.ingest import build_manifest_from_feeds

    store = LocalStorage(tmp_path)
    write_listing_records(store, "demo", "c1", [_listing("a", [_img(1), _img(2)]), _listing("b", [_img(3)])])
    write_listing_records(store, "demo", "c1", [_listing("c", [_img(4, image_id=None, status="rejected",
                                                                     reason="http_404"), _img(5)])], part=1)
    newer = _listing("a", [_img(2), _img(1), _img(6)], crawled_at="2026-11-22T10:00:00+00:00", crawl_id="c2")
    write_listing_records(store, "demo", "c2", [newer, _listing("d", [_img(1)], crawled_at="2026-11-22T10:00:00+00:00",
                                                               label=None, make=None, model=None, year=None)])
    write_listing_records(store, "other", "c3", [_listing("x", [_img(7)], site="other", listing_id="other:x")])
    store.put_text("listings/demo/c9/part-00000.jsonl", '{"broken json\n')

    records, read_stats = read_listing_records(store)
    manifest, rejects, stats = build_manifest(records)
    streamed, streamed_rejects, streamed_stats = build_manifest_from_feeds(store, batch=1)
    assert streamed.equals(manifest) and streamed_rejects.equals(rejects)
    for key in ("rows", "images", "listings", "rejected_refs", "listing_missing_label"):
        assert streamed_stats[key] == stats[key], key
    assert streamed_stats["bad_feed_line"] == read_stats["bad_feed_line"] == 1
    rows_a = [r for r in streamed.to_pylist() if r["listing_id"] == "demo:a"]
    assert [r["image_id"] for r in rows_a] == [f"{2:064x}", f"{1:064x}", f"{6:064x}"]  # the later record
    first_crawl = datetime(2026, 11, 21, 10, tzinfo=timezone.utc).timestamp() * 1_000_000
    assert [r["first_seen"] for r in rows_a] == [first_crawl, first_crawl + 1, first_crawl + 2]  # the earlier time


@pytest.mark.integration
def test_reimporting_a_folder_keeps_first_seen_and_the_shard_keys(tmp_path, prefect_server):
    """Folder A, then folder B, then A again: A's photos keep their first_seen (they do
    not move behind B's), so every shard keeps its key and nothing is decoded again."""
    from carflow.settings import FixSettings, QualitySettings
    from flows.ingest import ingest
    from tasks.clean import shard_config, shard_spec
    from tasks.shards import plan_shards

    files = _make_folder_dataset(LocalStorage(tmp_path / "a"))
    other = LocalStorage(tmp_path / "b")
    other.put("fiat_uno_2010/M1_0_x.jpg", _jpeg(7))
    other.put("fiat_uno_2010/M2_0_y.jpg", _jpeg(8))
    # A's photos: every non-empty file in a class folder but the notes (L1_0 and L3_0 share
    # bytes, so one id); the HTML named .jpg is imported for clean to judge
    a_ids = {_sha(data) for key, data in files.items() if data and "/" in key and not key.endswith(".txt")}
    b_ids = {_sha(_jpeg(7)), _sha(_jpeg(8))}
    dest = str(tmp_path / "dest")
    spec = shard_spec(shard_config(FixSettings(), QualitySettings()))

    def state():
        table = read_manifest(open_storage(dest), "manifests/ingest/manifest.parquet", INGEST_SCHEMA)
        seen = sorted(zip(table["listing_id"].to_pylist(), table["image_id"].to_pylist(),
                          table["first_seen"].to_pylist()))
        return seen, [spec.key(ids) for ids in plan_shards(table, 2)]

    ingest(storage=dest, folders=str(tmp_path / "a"), site="seed")
    ingest(storage=dest, folders=str(tmp_path / "b"), site="other")
    seen, keys = state()
    ingest(storage=dest, folders=str(tmp_path / "a"), site="seed")  # the same folder again
    assert state() == (seen, keys)
    assert {image_id for _, image_id, _ in seen} == a_ids | b_ids
    # A spans several shards and B's photos come after them: had A's first_seen moved
    # behind B's, every key would change
    assert len(a_ids) == 7 and len(keys) == math.ceil(len(a_ids | b_ids) / 2) == 5
