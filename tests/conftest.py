"""Shared fixtures: a real S3 endpoint (moto server over HTTP), storages of both backends,
the generated demo marketplace served on loopback, and one Prefect test server."""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Prefect reads these at import time: keep its home out of ~/.prefect, no analytics.
_PREFECT_HOME = tempfile.mkdtemp(prefix="carflow-prefect-home-")
atexit.register(shutil.rmtree, _PREFECT_HOME, True)
os.environ.setdefault("PREFECT_HOME", _PREFECT_HOME)
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# never pick up a developer's carflow.yaml or CARFLOW_ variables in tests
for _k in [k for k in os.environ if k.startswith("CARFLOW_")]:
    del os.environ[_k]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, timeout: float = 60.0) -> None:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except urllib.error.HTTPError:
            return  # it answered
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{url} did not come up within {timeout}s")


@pytest.fixture(scope="session")
def moto_server():
    """A real S3 endpoint: ``python -m moto.server`` on a free loopback port."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
        CARFLOW_STORAGE__ENDPOINT_URL=endpoint,
    )
    from carflow.settings import reset_settings

    reset_settings()
    try:
        _wait_http(endpoint)
        yield endpoint
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        os.environ.pop("CARFLOW_STORAGE__ENDPOINT_URL", None)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        reset_settings()


@pytest.fixture
def s3_uri(moto_server) -> str:
    """A fresh, empty bucket on the moto server: ``s3://bucket/prefix``."""
    import boto3

    bucket = f"carflow-test-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1").create_bucket(Bucket=bucket)
    return f"s3://{bucket}/run"


@pytest.fixture
def local_uri(tmp_path) -> str:
    return str(tmp_path / "store")


@pytest.fixture(params=["local", "s3"])
def storage_uri(request) -> str:
    """Both backends: every storage test runs against a folder and a real S3 endpoint."""
    if request.param == "local":
        return request.getfixturevalue("local_uri")
    return request.getfixturevalue("s3_uri")


@pytest.fixture
def storage(storage_uri):
    from carflow.storage import open_storage

    return open_storage(storage_uri)


@pytest.fixture(scope="session")
def demo_site_dir(tmp_path_factory) -> Path:
    """A small generated marketplace (seed 0, 24 listings, 4 classes)."""
    from demo.generate import generate_site

    out = tmp_path_factory.mktemp("demo-site")
    generate_site(out, seed=0, n_listings=24, n_classes=4)
    return out


@pytest.fixture(scope="session")
def demo_site(demo_site_dir):
    from demo.server import DemoSite

    with DemoSite(demo_site_dir) as site:
        yield site


#: loopback: no need for politeness delays in tests (the defaults stay polite)
FAST_CRAWL = {"AUTOTHROTTLE_ENABLED": False, "DOWNLOAD_DELAY": 0, "CONCURRENT_REQUESTS_PER_DOMAIN": 8}


@pytest.fixture(scope="session")
def crawl_to_manifest():
    """A function ``(base_url, storage_uri) -> storage_uri``: crawl a demo site there
    (a real ``scrapy crawl`` subprocess) and write manifest v0 from its listing feeds."""
    from carflow.manifest import INGEST_SCHEMA, manifest_key, write_manifest
    from carflow.storage import open_storage
    from spiders.run import run_crawl
    from tasks.ingest import build_manifest, read_listing_records

    def run(base_url: str, uri: str) -> str:
        run_crawl("demo", storage=uri, overrides=FAST_CRAWL, base_url=base_url)
        store = open_storage(uri)
        records, _ = read_listing_records(store)
        manifest, _, _ = build_manifest(records)
        write_manifest(store, manifest_key("ingest"), manifest, INGEST_SCHEMA)
        return uri

    return run


@pytest.fixture(scope="session")
def prefect_server():
    """One Prefect test server (temporary database) for the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield
