"""Storage keys have one home (carflow/keys.py): the shapes other modules rely on."""

from __future__ import annotations

import hashlib

import pyarrow as pa
import pytest

from carflow import keys


def test_key_shapes():
    iid = "ab" + "0" * 62
    assert keys.image_key(iid) == f"raw/ab/{iid}"
    # image ids are sha256 hex digests of the bytes; the vectorised form gives the same keys
    ids = [iid, *(hashlib.sha256(data).hexdigest() for data in (b"first photo", b"second photo"))]
    assert keys.image_keys(pa.array(ids)).to_pylist() == [keys.image_key(i) for i in ids]
    for bad in ("cd12", "AB" + "0" * 62, "../" + "0" * 61):
        with pytest.raises(ValueError, match="sha256"):
            keys.image_key(bad)
    assert keys.listings_prefix() == "listings/" and keys.listings_prefix("demo") == "listings/demo/"
    assert keys.listings_prefix("demo", "c1") == "listings/demo/c1/"
    assert keys.feed_part_key("demo", "c1", 3) == "listings/demo/c1/part-00003.jsonl"
    assert keys.crawl_stats_key("demo", "c1") == "crawls/demo/c1/stats.json"
    assert keys.manifest_key("clean") == "manifests/clean/manifest.parquet"
    assert keys.manifest_key("ingest", "rejects", prefix="m/") == "m/ingest/rejects.parquet"
    assert keys.shard_key("inspect", "k") == "work/inspect/k.parquet"
    assert keys.shard_stats_key("inspect", "k") == "work/inspect/k.stats.json"


def test_modules_use_the_one_home():
    """The modules that used to type keys now hand out carflow.keys' functions."""
    from carflow.manifest import manifest_key
    from carflow.storage import image_key
    from spiders.extensions import stats_key
    from spiders.pipelines.feed import feed_prefix, part_key

    assert manifest_key is keys.manifest_key and image_key is keys.image_key
    assert stats_key is keys.crawl_stats_key and part_key is keys.feed_part_key
    assert feed_prefix is keys.listings_prefix
