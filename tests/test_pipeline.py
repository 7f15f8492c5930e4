"""The crawl → ingest DAG through real Prefect flows: the same crawl into a local folder
and into S3 (moto server over HTTP) gives the same manifest, and it matches the ground
truth of the demo marketplace."""

from __future__ import annotations

import pytest

from carflow.demo_site.truth import compare, expected_ingest, load_ground_truth
from carflow.manifest import INGEST_SCHEMA, read_manifest
from carflow.storage import open_storage

pytestmark = pytest.mark.integration

#: columns that legitimately differ between two crawls of the same site
RUN_SPECIFIC = {"crawl_id", "first_seen"}


def _crawl_and_ingest(site, storage_uri: str) -> tuple[dict, list[dict]]:
    from flows.crawl import crawl
    from flows.ingest import ingest

    stats = crawl(site="demo", storage=storage_uri, base_url=site.url)
    assert stats["finish_reason"] == "finished"
    summary = ingest(storage=storage_uri, sites=["demo"])
    table = read_manifest(open_storage(storage_uri), "manifests/ingest/manifest.parquet", INGEST_SCHEMA)
    rows = [{k: v for k, v in r.items() if k not in RUN_SPECIFIC} for r in table.to_pylist()]
    return summary, sorted(rows, key=lambda r: (r["listing_id"], r["image_id"]))


def test_local_and_s3_give_the_same_manifest(demo_site, demo_site_dir, local_uri, s3_uri, prefect_server):
    expected = expected_ingest(load_ground_truth(demo_site_dir))
    local_summary, local_rows = _crawl_and_ingest(demo_site, local_uri)
    s3_summary, s3_rows = _crawl_and_ingest(demo_site, s3_uri)

    assert compare(expected, local_summary) == {}
    assert compare(expected, s3_summary) == {}
    assert local_rows == s3_rows
    assert {(r["listing_id"], r["image_id"]) for r in local_rows} == expected["pairs"]
    assert s3_summary["manifest"].startswith("s3://")
    # every manifest row points at stored bytes whose hash is its image_id
    s3 = open_storage(s3_uri)
    stored = set(s3.list("raw/"))
    assert {r["raw_key"] for r in s3_rows} == stored
