"""Ingest: listing records → manifest v0; seed-style folder datasets → the same manifest."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
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
