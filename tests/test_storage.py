"""Storage contract, run against both backends (a folder and a real S3 endpoint)."""

from __future__ import annotations

import hashlib
import pickle
from concurrent.futures import ThreadPoolExecutor

import pytest

from carflow.storage import (
    LocalStorage,
    S3Storage,
    StorageKeyError,
    image_key,
    open_storage,
)


def test_put_get_exists_delete(storage):
    assert not storage.exists("a/b.txt")
    storage.put("a/b.txt", b"hello")
    assert storage.exists("a/b.txt")
    assert storage.get("a/b.txt") == b"hello"
    storage.put("a/b.txt", b"again")  # overwrite
    assert storage.get("a/b.txt") == b"again"
    storage.delete("a/b.txt")
    assert not storage.exists("a/b.txt")
    storage.delete("a/b.txt")  # deleting a missing key is fine
    with pytest.raises(StorageKeyError):
        storage.get("a/b.txt")


def test_list_is_sorted_and_prefix_filtered(storage):
    for key in ["x/2.txt", "x/1.txt", "x/sub/3.txt", "xy/4.txt", "y/5.txt"]:
        storage.put(key, key.encode())
    assert list(storage.list("x/")) == ["x/1.txt", "x/2.txt", "x/sub/3.txt"]
    assert list(storage.list("x")) == ["x/1.txt", "x/2.txt", "x/sub/3.txt", "xy/4.txt"]
    assert len(list(storage.list())) == 5
    assert list(storage.list("nothing/")) == []


def test_put_image_is_content_addressed_and_idempotent(storage):
    data = b"\xff\xd8\xff fake jpeg bytes"
    image_id = storage.put_image(data)
    assert image_id == hashlib.sha256(data).hexdigest()
    assert storage.exists(image_key(image_id))
    assert storage.get_image(image_id) == data
    assert storage.put_image(data) == image_id
    assert list(storage.list("raw/")) == [image_key(image_id)]


def test_invalid_keys_are_rejected(storage):
    for bad in ["", "../escape", "a/../../b", "a//b"]:
        with pytest.raises(ValueError):
            storage.put(bad, b"x")
    with pytest.raises(ValueError):
        image_key("not-a-hash")


def test_concurrent_put_image_stores_once(storage):
    blobs = [bytes([i % 7]) * 1000 for i in range(40)]
    with ThreadPoolExecutor(8) as pool:
        ids = list(pool.map(storage.put_image, blobs))
    assert len(set(ids)) == 7
    assert len(list(storage.list("raw/"))) == 7
    for blob, image_id in zip(blobs, ids):
        assert storage.get_image(image_id) == blob


def test_storage_pickles_for_workers(storage):
    storage.put("k.txt", b"v")
    clone = pickle.loads(pickle.dumps(storage))
    assert clone.get("k.txt") == b"v"


def test_local_writes_are_atomic(tmp_path, monkeypatch):
    store = LocalStorage(tmp_path)
    store.put("f.bin", b"old")

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("os.replace", boom)
    with pytest.raises(OSError):
        store.put("f.bin", b"new")
    assert store.get("f.bin") == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]  # no temp file left


def test_open_storage_specs(tmp_path, moto_server):
    assert isinstance(open_storage(str(tmp_path)), LocalStorage)
    assert isinstance(open_storage(tmp_path.as_uri()), LocalStorage)
    s3 = open_storage("s3://bucket-x/some/prefix")
    assert isinstance(s3, S3Storage)
    assert (s3.bucket, s3.prefix, s3.endpoint_url) == ("bucket-x", "some/prefix", moto_server)
    assert s3.uri("a.txt") == "s3://bucket-x/some/prefix/a.txt"
    with pytest.raises(ValueError, match="scheme"):
        open_storage("gs://nope/x")


def test_s3_uses_adaptive_retries(s3_uri):
    store = open_storage(s3_uri)
    cfg = store.client.meta.config
    assert cfg.retries["mode"] == "adaptive"
    # botocore normalises max_attempts (retries) into total_max_attempts (first try + retries)
    assert cfg.retries.get("max_attempts", cfg.retries.get("total_max_attempts", 0) - 1) == 10
