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


def test_put_file_stores_the_rest_of_an_open_file(storage, tmp_path):
    """A manifest is written to a temporary file and stored from it (a 3 MB body: more than
    one read chunk), from the file's current position."""
    import os

    data = os.urandom(3 << 20)
    with open(tmp_path / "big.bin", "w+b") as fh:
        fh.write(b"skipped" + data)
        fh.seek(7)
        storage.put_file("m/manifest.parquet", fh, content_type="application/vnd.apache.parquet")
    assert storage.get("m/manifest.parquet") == data
    assert [k for k in storage.list("m/")] == ["m/manifest.parquet"]  # no temporary left behind
    with open(tmp_path / "back.bin", "w+b") as fh:  # and read back into an open file (the reduce's input)
        storage.get_file("m/manifest.parquet", fh)
        fh.seek(0)
        assert fh.read() == data
    with open(tmp_path / "none.bin", "wb") as fh, pytest.raises(StorageKeyError):
        storage.get_file("m/missing.parquet", fh)


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


class _FlakyProxy:
    """An HTTP proxy in front of the moto server that answers the next ``fail`` requests
    with S3's 503 SlowDown, then forwards everything: S3's real throttling, on the wire."""

    def __init__(self, upstream: str):
        import http.client
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        from urllib.parse import urlsplit

        self.fail = 0
        self.requests: list[tuple[str, int]] = []  # (method, status)
        target = urlsplit(upstream)
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_a):
                pass

            def _handle(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if proxy.fail > 0:
                    proxy.fail -= 1
                    proxy.requests.append((self.command, 503))
                    payload = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                conn = http.client.HTTPConnection(target.hostname, target.port, timeout=30)
                conn.request(self.command, self.path, body=body, headers=dict(self.headers))
                resp = conn.getresponse()
                data = resp.read()
                proxy.requests.append((self.command, resp.status))
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_s3_retries_throttling_on_the_wire(s3_uri, moto_server):
    """Real retry behaviour: S3 answers 503 SlowDown twice, the put and the get still
    succeed (botocore retried them, as configured), and with one attempt allowed the
    same throttle is an error."""
    from botocore.exceptions import ClientError

    bucket, _, prefix = s3_uri.removeprefix("s3://").partition("/")
    proxy = _FlakyProxy(moto_server)
    try:
        store = S3Storage(bucket, prefix, endpoint_url=proxy.url, max_attempts=4)
        proxy.fail = 2
        store.put("retry/a.bin", b"payload")
        assert [r for r in proxy.requests if r[0] == "PUT"] == [("PUT", 503), ("PUT", 503), ("PUT", 200)]
        proxy.fail = 2
        assert store.get("retry/a.bin") == b"payload"
        assert open_storage(s3_uri).get("retry/a.bin") == b"payload"  # really stored in moto

        once = S3Storage(bucket, prefix, endpoint_url=proxy.url, max_attempts=1)
        proxy.requests.clear()
        proxy.fail = 1
        with pytest.raises(ClientError, match="SlowDown|503"):
            once.put("retry/b.bin", b"x")
        assert proxy.requests == [("PUT", 503)]  # no second attempt
        assert not open_storage(s3_uri).exists("retry/b.bin")
    finally:
        proxy.close()
