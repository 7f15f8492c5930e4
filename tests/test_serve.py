"""The prediction API over real HTTP: uvicorn on a loopback port, a real registry on a
local folder, the real chain, batching, limits and swaps, with stand-in predictors
(tests/serve_helpers.py) so that each test takes seconds. The end-to-end run with models
trained by the pipeline's own code is in tests/test_serve_e2e.py (slow tier)."""

from __future__ import annotations

import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import numpy as np
import pytest
from PIL import Image
from serve_helpers import (
    CLASS_COLOURS,
    bomb_png,
    jpeg,
    register_stand_ins,
    running,
    scene,
    stand_in_loaders,
)

from carflow.registry import Registry
from carflow.settings import load_settings

pytestmark = pytest.mark.integration


def make_app(tmp_path, record=None, **serve):
    from serve.app import create_app

    registry = Registry(str(tmp_path / "store"))
    if not registry.versions("classifier"):
        register_stand_ins(registry, "v1", delay_s=serve.pop("delay_s", 0.0))
    settings = load_settings(storage={"root": str(tmp_path / "store")}, serve=serve)
    return create_app(settings, loaders=stand_in_loaders(record), registry=registry), registry


def post(base, data: bytes, name="photo.jpg", **kw):
    return httpx.post(f"{base}/predict", files={"file": (name, data, "application/octet-stream")}, timeout=30, **kw)


def test_predict_returns_top5_box_versions_and_timings(tmp_path):
    app, _ = make_app(tmp_path)
    with running(app) as base:
        for i, label in enumerate(CLASS_COLOURS):
            r = post(base, jpeg(scene(label, seed=i)))
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["status"] == "ok" and body["top"][0]["label"] == label
            assert len(body["top"]) == 5
            probs = [t["probability"] for t in body["top"]]
            assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
            x0, y0, x1, y1 = body["box"]  # the rectangle at (60, 50, 260, 190) padded by crop.margin (5%)
            assert (x0, y0, x1, y1) == (50, 43, 270, 197)
            assert body["versions"] == {"car_filter": "v1", "detector": "v1", "classifier": "v1"}
            assert set(body["timings_ms"]) == {"check", "queue", "car_filter", "detector", "classifier", "total"}
        top = post(base, jpeg(scene("fiat_500_2015"))).json()["top"][0]
        assert (top["make"], top["model"], top["year"]) == ("fiat", "500", 2015)
        top = post(base, jpeg(scene("mercedes-benz_c-class"))).json()["top"][0]
        assert (top["make"], top["model"]) == ("mercedes-benz", "c-class")


def test_bad_uploads_are_refused_with_status_and_reason(tmp_path):
    app, _ = make_app(tmp_path, max_upload_bytes=200_000, max_pixels=10_000_000)
    photo = jpeg(scene("audi_a4"))
    cases = {
        "non-car photo": (jpeg(scene(None)), 422, "no_car"),
        "0-byte file": (b"", 400, "empty"),
        "text file": (b"hello, this is not a photo\n" * 20, 415, "not_image"),
        "truncated JPEG": (photo[: len(photo) // 3], 422, "truncated"),
        "oversized upload": (np.random.default_rng(0).bytes(300_000), 413, "upload_too_large"),
        "decompression bomb": (bomb_png(), 422, "too_large"),
    }
    tiff = io.BytesIO()
    Image.fromarray(scene("audi_a4", size=(160, 120), box=(20, 20, 120, 100))).save(tiff, "TIFF")
    cases["unsupported type (TIFF)"] = (tiff.getvalue(), 415, "unsupported_format")
    with running(app) as base:
        for what, (data, status, reason) in cases.items():
            r = post(base, data)
            body = r.json()
            assert (r.status_code, body["reason"]) == (status, reason), f"{what}: {r.status_code} {body}"
            assert body["status"] == "rejected" and body["message"]
        no_car = post(base, jpeg(scene(None))).json()
        assert no_car["message"] == "no car found in this photo" and no_car["p_car"] < 0.7 and "top" not in no_car
        assert post(base, b"just text").json()["message"] == "this file is not an image"
        # a truncated JPEG missing only its last rows is kept, as the fixer keeps it
        assert post(base, photo[: len(photo) - 40]).status_code == 200
        # the upload cap is checked before the body is parsed: a chunked body over the cap too
        head = b'--x\r\nContent-Disposition: form-data; name="file"; filename="a.jpg"\r\n\r\n'
        big = np.random.default_rng(1).bytes(300_000)
        r = httpx.post(f"{base}/predict", content=iter([head, big[:100_000], big[100_000:]]),
                       headers={"content-type": "multipart/form-data; boundary=x"}, timeout=30)
        assert r.status_code == 413
        metrics = httpx.get(f"{base}/metrics").text
        assert 'carflow_images_total{reason="no_car",result="rejected"}' in metrics


def test_batch_endpoint_answers_each_image(tmp_path):
    app, _ = make_app(tmp_path)
    with running(app) as base:
        files = [("files", ("a.jpg", jpeg(scene("audi_a4")), "image/jpeg")),
                 ("files", ("b.txt", b"not an image at all", "text/plain")),
                 ("files", ("c.jpg", jpeg(scene("bmw_3-series")), "image/jpeg"))]
        r = httpx.post(f"{base}/predict/batch", files=files, timeout=30)
        assert r.status_code == 200
        res = r.json()["results"]
        assert [x["filename"] for x in res] == ["a.jpg", "b.txt", "c.jpg"]
        assert res[0]["top"][0]["label"] == "audi_a4" and res[2]["top"][0]["label"] == "bmw_3-series"
        assert res[1]["reason"] == "not_image" and res[1]["http_status"] == 415


def concurrently(n, fn, items):
    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(fn, items))


def test_concurrent_requests_share_one_forward_pass_per_model(tmp_path):
    record: dict = {}
    app, _ = make_app(tmp_path, record, max_batch_size=8, max_wait_ms=200, delay_s=0.05)
    photos = [jpeg(scene(label, seed=i)) for i, label in enumerate(list(CLASS_COLOURS) * 2)][:8]
    with running(app) as base:
        record["classifier"][0].calls.clear()
        record["car_filter"][0].calls.clear()
        results = concurrently(8, lambda p: post(base, p).json(), photos)
        assert all(r["status"] == "ok" for r in results)
        calls = record["car_filter"][0].calls
        assert sum(calls) == 8 and len(calls) < 8 and max(calls) > 1, calls
        assert max(r["batch_size"] for r in results) == max(calls)
        assert record["detector"][0].net.calls and len(record["classifier"][0].calls) == len(calls)


def test_without_batching_each_request_is_its_own_forward_pass(tmp_path):
    record: dict = {}
    app, _ = make_app(tmp_path, record, max_batch_size=1)
    with running(app) as base:
        record["car_filter"][0].calls.clear()
        concurrently(4, lambda p: post(base, p), [jpeg(scene("audi_a4"))] * 4)
        assert record["car_filter"][0].calls == [1, 1, 1, 1]


def test_a_full_queue_answers_503_with_retry_after(tmp_path):
    app, _ = make_app(tmp_path, max_batch_size=1, queue_size=2, delay_s=0.3, retry_after_s=2)
    with running(app) as base:
        responses = concurrently(12, lambda p: post(base, p), [jpeg(scene("audi_a4"))] * 12)
        codes = sorted(r.status_code for r in responses)
        assert 503 in codes and 200 in codes, codes
        busy = next(r for r in responses if r.status_code == 503)
        assert busy.headers["retry-after"] == "2" and busy.json()["reason"] == "overloaded"


def test_a_request_past_its_timeout_gets_504(tmp_path):
    app, _ = make_app(tmp_path, max_batch_size=1, delay_s=1.0, request_timeout_s=0.3)
    with running(app, timeout=60) as base:
        r = post(base, jpeg(scene("audi_a4")))
        assert r.status_code == 504 and r.json()["reason"] == "timeout"


def test_reload_under_8_concurrent_clients_fails_no_request(tmp_path):
    app, registry = make_app(tmp_path, max_batch_size=8, max_wait_ms=5)
    photos = [jpeg(scene(label, seed=i)) for i, label in enumerate(CLASS_COLOURS)]
    stop = threading.Event()
    seen: list[tuple[int, str | None]] = []

    def client(k: int) -> None:
        with httpx.Client(timeout=30) as c:
            i = k
            while not stop.is_set():
                r = c.post(f"{base}/predict", files={"file": ("p.jpg", photos[i % len(photos)], "image/jpeg")})
                seen.append((r.status_code, r.json().get("versions", {}).get("classifier")))
                i += 1

    with running(app) as base:
        threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        register_stand_ins(registry, "v2", temperature=2.0)
        r = httpx.post(f"{base}/reload", timeout=60)
        assert r.status_code == 200 and r.json()["versions"]["classifier"] == "v2", r.text
        time.sleep(0.5)
        stop.set()
        for t in threads:
            t.join(30)
        assert httpx.get(f"{base}/version").json()["versions"]["classifier"] == "v2"
    codes = [c for c, _ in seen]
    versions = [v for _, v in seen]
    assert len(seen) > 20 and codes.count(200) == len(codes), sorted(set(codes))
    assert "v1" in versions and "v2" in versions and versions[-1] == "v2"


def test_the_registry_pointer_is_polled(tmp_path):
    app, registry = make_app(tmp_path, reload_poll_s=0.2)
    with running(app) as base:
        register_stand_ins(registry, "v3")
        deadline = time.monotonic() + 20
        while httpx.get(f"{base}/version").json()["versions"]["classifier"] != "v3":
            assert time.monotonic() < deadline, "the new version was not picked up"
            time.sleep(0.1)
        assert post(base, jpeg(scene("audi_a4"))).json()["versions"]["detector"] == "v3"


def test_a_pinned_version_is_served_and_ready_waits_for_the_models(tmp_path):
    from serve.app import create_app

    registry = Registry(str(tmp_path / "store"))
    register_stand_ins(registry, "v1")
    register_stand_ins(registry, "v2")
    loaders = stand_in_loaders()
    slow = loaders["classifier"]
    loaders["classifier"] = lambda v, s: (time.sleep(1.5), slow(v, s))[1]
    settings = load_settings(storage={"root": str(tmp_path / "store")}, serve={"classifier": "v1"})
    with running(create_app(settings, loaders=loaders, registry=registry), ready=False) as base:
        assert httpx.get(f"{base}/health").json() == {"status": "ok"}
        assert httpx.get(f"{base}/ready").status_code == 503
        assert post(base, jpeg(scene("audi_a4"))).json()["reason"] == "not_ready"
        deadline = time.monotonic() + 30
        while httpx.get(f"{base}/ready").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert httpx.get(f"{base}/version").json()["versions"] == {
            "car_filter": "v2", "detector": "v2", "classifier": "v1"}


def test_missing_models_keep_the_process_up_and_say_what_to_run(tmp_path):
    from serve.app import create_app

    settings = load_settings(storage={"root": str(tmp_path / "empty")})
    with running(create_app(settings, loaders=stand_in_loaders()), ready=False) as base:
        deadline = time.monotonic() + 10
        while not (r := httpx.get(f"{base}/ready")).json()["error"]:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert r.status_code == 503 and "carflow car-filter train" in r.json()["error"]


class _PhotoHandler(BaseHTTPRequestHandler):
    photo = b""

    def do_GET(self):  # noqa: N802
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(self.photo)))
        self.end_headers()
        self.wfile.write(self.photo)

    def log_message(self, *a):
        pass


def test_url_input_is_off_by_default_and_fetches_only_allowed_hosts(tmp_path):
    _PhotoHandler.photo = jpeg(scene("bmw_3-series"))
    photos = ThreadingHTTPServer(("127.0.0.1", 0), _PhotoHandler)
    threading.Thread(target=photos.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{photos.server_address[1]}/car.jpg"
    try:
        app, _ = make_app(tmp_path)
        with running(app) as base:
            r = httpx.post(f"{base}/predict", data={"url": url})
            assert (r.status_code, r.json()["reason"]) == (400, "url_input_off")
        app, _ = make_app(tmp_path, url_input=True, url_allowed_hosts=["127.0.0.1"])
        with running(app) as base:
            r = httpx.post(f"{base}/predict", data={"url": url}, timeout=30)
            assert r.status_code == 200 and r.json()["top"][0]["label"] == "bmw_3-series"
            for bad in (url.replace("127.0.0.1", "localhost"), "file:///etc/passwd", "ftp://127.0.0.1/x.jpg"):
                r = httpx.post(f"{base}/predict", data={"url": bad})
                assert (r.status_code, r.json()["reason"]) == (400, "url_not_allowed"), bad
        app, _ = make_app(tmp_path, url_input=True, url_allowed_hosts=["127.0.0.1"], max_upload_bytes=1000)
        with running(app) as base:
            r = httpx.post(f"{base}/predict", data={"url": url})
            assert (r.status_code, r.json()["reason"]) == (413, "upload_too_large")
    finally:
        photos.shutdown()


def test_api_key_from_the_environment_and_cors_off_by_default(tmp_path, monkeypatch):
    monkeypatch.setenv("CARFLOW_TEST_KEY", "s3cret")
    app, _ = make_app(tmp_path, api_key_env="CARFLOW_TEST_KEY")
    with running(app) as base:
        photo = jpeg(scene("audi_a4"))
        assert post(base, photo).status_code == 401
        assert post(base, photo, headers={"X-API-Key": "wrong"}).status_code == 401
        assert post(base, photo, headers={"X-API-Key": "s3cret"}).status_code == 200
        assert httpx.get(f"{base}/health").status_code == 200
        pre = httpx.options(f"{base}/predict", headers={"Origin": "http://example.test",
                                                        "Access-Control-Request-Method": "POST"})
        assert "access-control-allow-origin" not in pre.headers
    app, _ = make_app(tmp_path, cors_origins=["http://example.test"])
    with running(app) as base:
        pre = httpx.options(f"{base}/predict", headers={"Origin": "http://example.test",
                                                        "Access-Control-Request-Method": "POST"})
        assert pre.headers["access-control-allow-origin"] == "http://example.test"


def test_page_is_served(tmp_path):
    app, _ = make_app(tmp_path)
    with running(app) as base:
        r = httpx.get(base + "/")
        assert r.status_code == 200 and "text/html" in r.headers["content-type"] and 'id="drop"' in r.text


def test_importing_serve_loads_no_model_framework():
    import subprocess
    import sys

    code = ("import sys, serve.app, serve.chain, serve.batching; "
            "bad = [m for m in ('tensorflow', 'torch', 'ultralytics', 'keras', 'tasks', 'flows') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_cli_and_compose_expose_the_service(capsys):
    import yaml

    from flows.cli import COMMANDS, main

    assert COMMANDS["serve"][0] == "serve.app"
    with pytest.raises(SystemExit) as done:
        main(["serve", "--help"])
    assert done.value.code == 0 and "--max-batch-size" in capsys.readouterr().out
    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    svc = yaml.safe_load((root / "docker-compose.yml").read_text())["services"]["serve"]
    assert svc["command"][:2] == ["carflow", "serve"] and "8000:8000" in svc["ports"]
    assert (root / svc["build"]["context"] / svc["build"]["dockerfile"]).is_file()
    assert "http://127.0.0.1:8000/" in (root / "README.md").read_text()


def test_serve_settings_validate_overrides():
    from carflow.settings import SettingsError
    from serve.app import serve_settings

    s = serve_settings(load_settings(), max_batch_size=4, classifier="v7", port=None)
    assert (s.serve.max_batch_size, s.serve.classifier, s.serve.port) == (4, "v7", 8000)
    with pytest.raises((SettingsError, ValueError)):
        serve_settings(load_settings(), max_batch_size=0)
