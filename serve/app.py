"""The FastAPI app: ``carflow serve`` / ``python -m serve.app``.

| endpoint | what |
|---|---|
| ``GET /`` | the web page (``serve/static/index.html``: pick or drop a photo, see the box and the top-5) |
| ``POST /predict`` | one photo (multipart ``file``, or form field ``url`` when ``serve.url_input`` is on) |
| ``POST /predict/batch`` | several photos (multipart ``files``), one result each |
| ``GET /health`` | liveness: the process answers |
| ``GET /ready`` | 200 only once the three models are loaded and warmed up |
| ``GET /version`` | the version of each model, and the specs they came from |
| ``GET /metrics`` | Prometheus counters and latency histograms |
| ``POST /reload`` | resolve the specs again, warm the new versions, swap them in |

A photo goes through the fixer in the request (:func:`serve.chain.check_photo`: the clean
stage's own :func:`carflow.fixer.fix_image`; limits first: bytes → 413 before anything is
read past the cap, declared pixels → 422 and an unsupported type → 415 from the header,
before any decode; every other drop reason of the fixer → its 4xx), then joins the dynamic batch (:mod:`serve.batching`) for the
car filter → YOLO crop → classifier (:mod:`serve.chain`). A refused photo gets a 4xx body
``{"status": "rejected", "reason", "message", "detail"}``; "no car" carries ``p_car``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from fastapi import Depends, FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from carflow.fixer import DecodeBudget
from carflow.registry import Registry
from carflow.settings import ServeSettings, Settings, get_settings
from serve.batching import Batcher, QueueFull
from serve.chain import (
    KINDS,
    MESSAGES,
    STATUS,
    Engine,
    Loader,
    Photo,
    check_photo,
    fix_settings,
    rejection,
)

log = logging.getLogger("carflow.serve")
STATIC = Path(__file__).with_name("static")
#: multipart framing allowance on top of the file caps
FORM_OVERHEAD = 64 * 1024
#: an over-long body is read and discarded up to this much (so the client sees the 413), then cut off
DRAIN_LIMIT = 16 * 1024 * 1024


class Metrics:
    """Prometheus metrics in the app's own registry (two apps in one process never clash)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("carflow_requests", "HTTP requests", ["endpoint", "code"], registry=r)
        self.images = Counter("carflow_images", "images answered", ["result", "reason"], registry=r)
        self.latency = Histogram("carflow_request_seconds", "request latency", ["endpoint"], registry=r,
                                 buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))
        self.step = Histogram("carflow_step_seconds", "time per step (model steps: per batch)", ["step"],
                              registry=r, buckets=(.001, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5))
        self.batch = Histogram("carflow_batch_size", "images per forward pass", registry=r,
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128))
        self.queue_wait = Histogram("carflow_queue_wait_seconds", "wait for a batch to start", registry=r,
                                    buckets=(.001, .005, .01, .025, .05, .1, .25, .5, 1, 5))
        self.queue_depth = Gauge("carflow_queue_depth", "images waiting for the model", registry=r)
        self.reloads = Counter("carflow_reloads", "model reloads", ["result"], registry=r)

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class BodyLimit:
    """ASGI middleware: a request body over the cap is answered 413 before the app (and
    the multipart parser) sees it: by ``Content-Length`` at once, or by counting a chunked
    body as it arrives. The rest of the body is read and dropped (up to
    :data:`DRAIN_LIMIT`) so the client reads the answer instead of a reset."""

    def __init__(self, app: Any, limits: Mapping[str, int]):
        self.app = app
        self.limits = dict(limits)

    async def _reject(self, send: Any, limit: int) -> None:
        body = json.dumps(rejection("upload_too_large", f"the request body is over {limit:,} bytes")).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"connection", b"close"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    async def _drain(self, receive: Any, already: int) -> None:
        seen = already
        while seen < DRAIN_LIMIT:
            msg = await receive()
            if msg["type"] != "http.request":
                return
            seen += len(msg.get("body", b""))
            if not msg.get("more_body"):
                return

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        limit = self.limits.get(scope.get("path", "")) if scope["type"] == "http" else None
        if limit is None:
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await self._drain(receive, 0)
            await self._reject(send, limit)
            return
        received = 0
        over = False
        replaced = False

        async def counted() -> Any:
            nonlocal received, over
            if over:
                return {"type": "http.request", "body": b"", "more_body": False}
            msg = await receive()
            if msg["type"] == "http.request":
                received += len(msg.get("body", b""))
                if received > limit:
                    # the app sees the body end here; whatever it answers is replaced by the 413
                    over = True
                    if msg.get("more_body"):
                        await self._drain(receive, received)
                    return {"type": "http.request", "body": b"", "more_body": False}
            return msg

        async def guarded(msg: Any) -> None:
            nonlocal replaced
            if not over:
                await send(msg)
            elif not replaced:
                replaced = True
                await self._reject(send, limit)

        await self.app(scope, counted, guarded)


def _reply(body: dict[str, Any], retry_after: int | None = None):
    code = int(body.get("http_status", 200))
    headers = {"Retry-After": str(retry_after)} if code == 503 and retry_after else None
    return JSONResponse(body, status_code=code, headers=headers)


def create_app(settings: Settings | None = None, loaders: Mapping[str, Loader] | None = None,
               registry: Registry | None = None) -> Any:
    """The app for ``settings`` (default: the process settings). ``loaders`` replaces how a
    kind's predictor is built from its registry version (tests, benches)."""
    settings = settings or get_settings()
    cfg: ServeSettings = settings.serve
    fix = fix_settings(settings)
    #: the fixer's bound on decoded pixels held at once, shared by the request threads
    budget = DecodeBudget(fix.decode_memory_mb << 20)
    engine = Engine(settings, registry=registry, loaders=loaders)
    metrics = Metrics()
    state: dict[str, Any] = {"ready": False, "error": None, "tasks": []}

    def infer(photos: list[Photo]) -> list[dict[str, Any]]:
        chain = engine.chain  # read once: a swap during this batch affects the next one
        if chain is None:
            raise RuntimeError("no models loaded")
        results = chain.run(photos)
        if results:
            for step, ms in results[0]["model_ms"].items():
                metrics.step.labels(step).observe(ms / 1000)
        return results

    def on_batch(size: int, wait_s: float) -> None:
        metrics.batch.observe(size)

    batcher = Batcher(infer, cfg.max_batch_size, cfg.max_wait_ms, cfg.queue_size, on_batch)

    async def load_models() -> None:
        try:
            info = await asyncio.to_thread(engine.reload)
            metrics.reloads.labels("ok").inc()
            state.update(ready=True, error=None)
            log.info("models loaded and warm: %s (%.1fs)", info["versions"], info["seconds"])
        except Exception as exc:  # noqa: BLE001 - /ready reports it; the process stays up
            metrics.reloads.labels("error").inc()
            state["error"] = f"{type(exc).__name__}: {exc}"
            log.error("carflow serve: models not loaded: %s", exc)

    async def poll_registry() -> None:
        while True:
            await asyncio.sleep(cfg.reload_poll_s)
            if not state["ready"]:
                continue
            try:
                if await asyncio.to_thread(engine.changed):
                    await asyncio.to_thread(engine.reload)
                    metrics.reloads.labels("ok").inc()
            except Exception as exc:  # noqa: BLE001 - keep serving the current chain
                metrics.reloads.labels("error").inc()
                log.warning("registry poll: %s", exc)

    @contextlib.asynccontextmanager
    async def lifespan(_app: Any):
        batcher.start()
        state["tasks"].append(asyncio.create_task(load_models()))
        if cfg.reload_poll_s > 0:
            state["tasks"].append(asyncio.create_task(poll_registry()))
        yield
        for t in state["tasks"]:
            t.cancel()
        await batcher.stop()

    app = FastAPI(title="carflow", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.engine, app.state.batcher, app.state.metrics = engine, batcher, metrics
    app.add_middleware(BodyLimit, limits={
        "/predict": cfg.max_upload_bytes + FORM_OVERHEAD,
        "/predict/batch": cfg.max_upload_bytes * cfg.max_batch_files + FORM_OVERHEAD,
    })
    if cfg.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=cfg.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["*"])

    def check_key(request: Request) -> None:
        expected = os.environ.get(cfg.api_key_env, "") if cfg.api_key_env else ""
        if expected and request.headers.get("x-api-key") != expected:
            raise HTTPException(401, detail=f"missing or wrong X-API-Key (the key is set by ${cfg.api_key_env})")

    @app.middleware("http")
    async def observe(request: Request, call_next: Any):
        started = time.perf_counter()
        response = await call_next(request)
        path = request.url.path
        endpoint = path if path in ("/predict", "/predict/batch", "/reload", "/ready", "/health", "/version") else "other"
        metrics.requests.labels(endpoint, str(response.status_code)).inc()
        metrics.latency.labels(endpoint).observe(time.perf_counter() - started)
        return response

    async def predict_bytes(data: bytes) -> dict[str, Any]:
        started = time.perf_counter()
        if len(data) > cfg.max_upload_bytes:
            return rejection("upload_too_large", f"{len(data):,} bytes > serve.max_upload_bytes {cfg.max_upload_bytes:,}")
        if not state["ready"]:
            return rejection("not_ready", state["error"] or "loading")
        chain = engine.chain
        photo = await run_in_threadpool(check_photo, data, fix, budget, chain.car_filter if chain else None)
        if not isinstance(photo, Photo):
            return photo
        checked = time.perf_counter()
        metrics.step.labels("check").observe(checked - started)
        metrics.queue_depth.set(batcher.depth)
        try:
            result, wait_s = await asyncio.wait_for(batcher.submit(photo), cfg.request_timeout_s)
        except QueueFull as exc:
            return rejection("overloaded", str(exc))
        except (asyncio.TimeoutError, TimeoutError):
            return rejection("timeout", f"no result within serve.request_timeout_s={cfg.request_timeout_s}s")
        metrics.queue_wait.observe(wait_s)
        out = dict(result)
        model_ms = out.pop("model_ms")
        out["image"] = {"width": int(photo.image.shape[1]), "height": int(photo.image.shape[0])}
        out["timings_ms"] = {"check": round((checked - started) * 1000, 2), "queue": round(wait_s * 1000, 2),
                             **model_ms, "total": round((time.perf_counter() - started) * 1000, 2)}
        return out

    async def fetch_url(url: str) -> bytes | dict[str, Any]:
        import httpx

        if not cfg.url_input:
            return rejection("url_input_off", "serve.url_input is off [CARFLOW_SERVE__URL_INPUT]")
        parsed = urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            return rejection("url_not_allowed", "only http(s) urls are fetched")
        if parsed.hostname not in cfg.url_allowed_hosts:
            return rejection("url_not_allowed", f"host {parsed.hostname!r} is not in serve.url_allowed_hosts")
        try:
            async with httpx.AsyncClient(timeout=cfg.url_timeout_s, follow_redirects=False) as client:
                async with client.stream("GET", url) as resp:
                    if resp.status_code != 200:
                        return rejection("url_fetch_failed", f"HTTP {resp.status_code}")
                    chunks, size = [], 0
                    async for chunk in resp.aiter_bytes():
                        size += len(chunk)
                        if size > cfg.max_upload_bytes:
                            return rejection("upload_too_large", f"the url's body is over {cfg.max_upload_bytes:,} bytes")
                        chunks.append(chunk)
                    return b"".join(chunks)
        except httpx.HTTPError as exc:
            return rejection("url_fetch_failed", f"{type(exc).__name__}: {exc}"[:300])

    def count(body: dict[str, Any]) -> dict[str, Any]:
        ok = body.get("status") == "ok"
        metrics.images.labels("ok" if ok else "rejected", "" if ok else body.get("reason", "")).inc()
        return body

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        if state["ready"] and engine.chain is not None:
            return {"ready": True, "versions": engine.chain.versions}
        return JSONResponse({"ready": False, "error": state["error"]}, status_code=503,
                            headers={"Retry-After": str(cfg.retry_after_s)})

    @app.get("/version")
    async def version():
        chain = engine.chain
        return {"versions": chain.versions if chain else None, "specs": engine.specs(),
                "loaded_at": chain.loaded_at if chain else None, "labels": len(chain.labels()) if chain else None}

    @app.get("/metrics", include_in_schema=False)
    async def metrics_endpoint():
        metrics.queue_depth.set(batcher.depth)
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.post("/predict", dependencies=[Depends(check_key)])
    async def predict(file: UploadFile | None = File(None), url: str | None = Form(None)):
        if file is not None:
            data = await file.read()
        elif url:
            fetched = await fetch_url(url)
            if isinstance(fetched, dict):
                return _reply(count(fetched))
            data = fetched
        else:
            return _reply(rejection("no_input", "multipart field 'file' (or 'url')"))
        return _reply(count(await predict_bytes(data)), cfg.retry_after_s)

    @app.post("/predict/batch", dependencies=[Depends(check_key)])
    async def predict_batch(files: list[UploadFile] = File(...)):
        if len(files) > cfg.max_batch_files:
            return _reply(rejection("too_many_files", f"{len(files)} > serve.max_batch_files {cfg.max_batch_files}"))
        blobs = [await f.read() for f in files]
        results = await asyncio.gather(*(predict_bytes(b) for b in blobs))
        for f, r in zip(files, results):
            r["filename"] = f.filename
            count(r)
        busy = any(r.get("reason") == "overloaded" for r in results)
        headers = {"Retry-After": str(cfg.retry_after_s)} if busy else None
        return JSONResponse({"results": results}, headers=headers)

    @app.post("/reload", dependencies=[Depends(check_key)])
    async def reload():
        try:
            info = await asyncio.to_thread(engine.reload)
        except Exception as exc:  # noqa: BLE001 - the old chain keeps serving
            metrics.reloads.labels("error").inc()
            return JSONResponse({"reloaded": False, "error": f"{type(exc).__name__}: {exc}",
                                 "versions": engine.chain.versions if engine.chain else None}, status_code=409)
        metrics.reloads.labels("ok").inc()
        state.update(ready=True, error=None)
        return {"reloaded": True, **info}

    return app


def serve_settings(base: Settings, **overrides: Any) -> Settings:
    """``base`` with ``serve`` fields replaced (validated); None values are ignored."""
    data = {**base.serve.model_dump(), **{k: v for k, v in overrides.items() if v is not None}}
    out = base.model_copy()
    out.serve = ServeSettings.model_validate(data)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="carflow serve", description="the prediction API and its web page")
    parser.add_argument("--host")
    parser.add_argument("--port", type=int)
    for kind in KINDS:
        parser.add_argument(f"--{kind.replace('_', '-')}", dest=kind,
                            help=f"{kind} spec: latest, a version, a path or s3:// URI (serve.{kind})")
    parser.add_argument("--max-batch-size", type=int)
    parser.add_argument("--max-wait-ms", type=float)
    parser.add_argument("--reload-poll-s", type=float)
    args = parser.parse_args(argv)
    import uvicorn

    settings = serve_settings(get_settings(), **{k: v for k, v in vars(args).items()})
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    app = create_app(settings)
    print(f"carflow serve: http://{settings.serve.host}:{settings.serve.port}/ (the page), /docs (the API)")
    uvicorn.run(app, host=settings.serve.host, port=settings.serve.port, log_level="warning")
    return 0


__all__ = ["MESSAGES", "STATUS", "create_app", "main", "serve_settings"]


if __name__ == "__main__":
    raise SystemExit(main())
