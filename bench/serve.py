"""Serving throughput and latency: carflow with dynamic batching, carflow without it, and
a seed-style Flask app that calls ``model.predict`` once per request, in one run.

    YOLO_OFFLINE=1 python -m bench.serve [--requests 96] [--levels 1 8 32] [--image-size 96]

Each server runs in its own process on a loopback port; the load generator (asyncio +
httpx) sends a bounded number of requests at 1, 8 and 32 concurrent clients, the same
generated demo car photos (JPEG, 320×240) to every server, and prints requests/s and
p50/p95/p99 latency per server and level, then the ratios to the seed-style app.

The models are small and random-init (``weights=none``), built by the real code:
the car filter is ``models.car_filter.build_car_filter`` (MobileNetV2, alpha 0.35), the
detector is ``models.crop.CropPredictor`` over ``yolov5nu.yaml`` (``DetectorNet``), and the
classifier a MobileNetV2 (alpha 0.35) softmax head saved as ``.keras``. The seed-style app
loads the SAME classifier file and runs it alone (decode → resize → ``model.predict``)
per request, as the seeds' Flask apps did; carflow runs its whole chain (fixer checks →
car filter → crop → classifier) per photo, batched across requests. The random detector
is run at ``conf=0`` with every class kept, so every photo gets a box and reaches the
classifier (otherwise nothing would be classified); the car filter threshold is 0 for
the same reason.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LABELS = [f"make{i}_model{i}" for i in range(8)]


# -- the models ----------------------------------------------------------------------------
def build_models(out: Path, image_size: int) -> dict[str, str]:
    """car_filter.keras, classifier.keras (random init, spread so outputs differ per image)."""
    from carflow.frameworks import import_keras
    from models.car_filter import build_car_filter, spread_random_init

    keras = import_keras()
    cf = spread_random_init(build_car_filter("none", image_size, alpha=0.35))
    cf.save(out / "car_filter.keras")
    inputs = keras.Input((image_size, image_size, 3))
    x = keras.layers.Rescaling(1 / 127.5, offset=-1.0)(inputs)
    x = keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=(image_size, image_size, 3),
                                       alpha=0.35, pooling="avg")(x)
    outputs = keras.layers.Dense(len(LABELS), activation="softmax")(x)
    keras.Model(inputs, outputs).save(out / "classifier.keras")
    return {"car_filter": str(out / "car_filter.keras"), "classifier": str(out / "classifier.keras")}


class KerasImages:
    """A Keras model on decoded images: resize to its input size, one call per batch
    (``tf.function`` on the TensorFlow backend; ``predict_on_batch`` on torch/JAX). The
    car filter is the real ``CarFilterPredictor``, whose decode is tf.data: the bench needs
    TensorFlow installed whatever ``KERAS_BACKEND`` says."""

    def __init__(self, path: str, version: str):
        from carflow.frameworks import import_keras

        keras = import_keras()
        self.model = keras.models.load_model(path, compile=False)
        self.image_size = int(self.model.input_shape[1])
        self.version = version
        self.tf = None
        if keras.backend.backend() == "tensorflow":
            from carflow.frameworks import import_tensorflow

            self.tf = import_tensorflow()
            self.fn = self.tf.function(lambda x: self.model(x, training=False), reduce_retracing=True)

    def __call__(self, images):
        import numpy as np

        s = self.image_size
        if self.tf is not None:
            x = self.tf.stack([self.tf.image.resize(np.asarray(im), (s, s)) for im in images])
            return np.asarray(self.fn(self.tf.cast(x, self.tf.float32)))
        from PIL import Image

        x = np.stack([np.asarray(Image.fromarray(np.asarray(im)).resize((s, s), Image.BILINEAR), np.float32)
                      for im in images])
        return np.asarray(self.model.predict_on_batch(x))


class BenchClassifier(KerasImages):
    labels = LABELS
    temperature = 1.0

    def predict_proba(self, images, calibrated=True):
        return self(images)


def run_carflow(port: int, models: dict[str, str], store: str, batching: bool) -> None:
    """A carflow server (blocking): the three models registered in a local registry."""
    import uvicorn

    from carflow.registry import Registry
    from carflow.settings import load_settings
    from models.car_filter import CarFilterPredictor, load_model_file
    from models.crop import CropPredictor
    from serve.app import create_app

    registry = Registry(store)
    for kind, main, path in (("car_filter", "model.keras", models["car_filter"]),
                             ("detector", "weights.pt", None),
                             ("classifier", "model.keras", models["classifier"])):
        files = {main: Path(path).read_bytes() if path else b"yolov5nu.yaml (random init)"}
        registry.promote(kind, registry.put_version(kind, files, {"labels": LABELS}, version=f"bench-{kind}"))
    crop = {"weights": "none", "conf": 0.0, "keep_classes": list(range(80)), "imgsz": 160, "min_side": 1}
    serve = {"max_batch_size": 32 if batching else 1, "max_wait_ms": 5.0 if batching else 0.0,
             "queue_size": 256, "car_threshold": 0.0, "request_timeout_s": 120}
    settings = load_settings(storage={"root": store}, crop=crop, serve=serve, fix={"min_side": 32})
    loaders = {
        # the real predictor (its one decode + resize), in Keras fp32 as the classifier runs here
        "car_filter": lambda v, s: CarFilterPredictor(load_model_file(str(v.local_path())), "keras", "fp32", v.version),
        "detector": lambda v, s: CropPredictor.load("none", s.crop, version=v.version),
        "classifier": lambda v, s: BenchClassifier(str(v.local_path()), v.version),
    }
    uvicorn.run(create_app(settings, loaders=loaders, registry=registry), host="127.0.0.1", port=port,
                log_level="warning")


def run_seed(port: int, models: dict[str, str]) -> None:
    """The seeds' shape: Flask, one ``model.predict`` per request on the classifier."""
    import io

    import numpy as np
    from flask import Flask, jsonify, request
    from PIL import Image

    from carflow.frameworks import import_keras

    model = import_keras().models.load_model(models["classifier"], compile=False)
    size = int(model.input_shape[1])
    app = Flask("seed")

    @app.post("/predict")
    def predict():
        img = Image.open(io.BytesIO(request.files["file"].read())).convert("RGB").resize((size, size))
        probs = model.predict(np.expand_dims(np.asarray(img, dtype=np.float32), 0), verbose=0)[0]
        top = np.argsort(-probs)[:5]
        return jsonify({"top": [{"label": LABELS[i], "probability": float(probs[i])} for i in top]})

    @app.get("/health")
    def health():
        return {"status": "ok"}

    app.run("127.0.0.1", port, threaded=True)


# -- the load ------------------------------------------------------------------------------
def photos(n: int = 16) -> list[bytes]:
    import numpy as np

    from demo.render import CAR_STYLES, jpeg, render_car

    styles = list(CAR_STYLES.values())
    rng = np.random.default_rng(0)
    return [jpeg(render_car(styles[i % len(styles)], (320, 240), rng).image, quality=90) for i in range(n)]


async def load(base: str, images: list[bytes], clients: int, requests: int, max_s: float) -> dict:
    import httpx

    latencies: list[float] = []
    failures = 0
    sent = 0
    deadline = time.perf_counter() + max_s

    async def client(c: httpx.AsyncClient, k: int) -> None:
        nonlocal sent, failures
        while sent < requests and time.perf_counter() < deadline:
            i = sent
            sent += 1
            t = time.perf_counter()
            r = await c.post(f"{base}/predict", files={"file": ("car.jpg", images[i % len(images)], "image/jpeg")})
            latencies.append(time.perf_counter() - t)
            if r.status_code != 200:
                failures += 1

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=300, limits=limits) as c:
        started = time.perf_counter()
        await asyncio.gather(*(client(c, k) for k in range(clients)))
        wall = time.perf_counter() - started
    lat = sorted(latencies)

    def pct(p: float) -> float:
        return lat[min(len(lat) - 1, int(round(p / 100 * (len(lat) - 1))))] * 1000

    return {"requests": len(lat), "failures": failures, "rps": len(lat) / wall, "p50": pct(50), "p95": pct(95),
            "p99": pct(99)}


def wait_up(base: str, path: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{base} exited with {proc.returncode}")
        try:
            if httpx.get(base + path, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{base}{path} not up within {timeout}s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=96, help="requests per level (bounded)")
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--max-s", type=float, default=120, help="time cap per level")
    parser.add_argument("--json", help="write the figures here too")
    parser.add_argument("--_server", choices=["batched", "unbatched", "seed"], help=argparse.SUPPRESS)
    parser.add_argument("--_port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--_dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._server:
        models = json.loads((Path(args._dir) / "models.json").read_text())
        if args._server == "seed":
            run_seed(args._port, models)
        else:
            run_carflow(args._port, models, str(Path(args._dir) / f"store-{args._server}"), args._server == "batched")
        return 0

    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    device = describe_device()
    results: dict[str, dict[int, dict]] = {}
    with tempfile.TemporaryDirectory(prefix="carflow-bench-serve-") as tmp:
        models = build_models(Path(tmp), args.image_size)
        (Path(tmp) / "models.json").write_text(json.dumps(models))
        images = photos()
        names = ("batched", "unbatched", "seed")
        env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        servers: dict[str, tuple[str, subprocess.Popen]] = {}
        try:
            for name in names:  # all three up at once; measured in turn, level by level, so that
                port = free_port()  # a change in the machine's load hits all three alike
                servers[name] = (f"http://127.0.0.1:{port}", subprocess.Popen(
                    [sys.executable, "-m", "bench.serve", "--_server", name, "--_port", str(port), "--_dir", tmp],
                    cwd=ROOT, env=env, stdout=subprocess.DEVNULL))
            for name, (base, proc) in servers.items():
                wait_up(base, "/health" if name == "seed" else "/ready", proc)
            for n in args.levels:
                for name in names:
                    base = servers[name][0]
                    # warm-up at this concurrency, not counted (first batches of a new size compile)
                    asyncio.run(load(base, images, n, 2 * n, args.max_s))
                    results.setdefault(name, {})[n] = r = asyncio.run(
                        load(base, images, n, max(args.requests, 4 * n), args.max_s))
                    print(f"{name:>9} {n:>3} clients: {r['rps']:7.1f} req/s  p50 {r['p50']:7.1f} ms  "
                          f"p95 {r['p95']:7.1f} ms  p99 {r['p99']:7.1f} ms  ({r['requests']} requests, "
                          f"{r['failures']} failed)", flush=True)
        finally:
            for _base, proc in servers.values():
                proc.terminate()
            for _base, proc in servers.values():
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
    print(f"\ndevice: {device}; image size {args.image_size}; ratios to the seed-style app "
          "(throughput x, p95 x: lower is better)")
    for n in args.levels:
        seed = results["seed"][n]
        parts = [f"{name} {results[name][n]['rps'] / seed['rps']:.2f}x rps, p95 "
                 f"{results[name][n]['p95'] / seed['p95']:.2f}x" for name in ("batched", "unbatched")]
        print(f"{n:>3} clients: " + "; ".join(parts))
    if args.json:
        Path(args.json).write_text(json.dumps({"device": device, "results": results}, indent=2))
    return 0


def describe_device() -> str:
    """The accelerator the Keras backend will use, else the CPU."""
    from carflow.frameworks import import_keras

    backend = import_keras().backend.backend()
    if backend == "tensorflow":
        from carflow.frameworks import import_tensorflow

        gpus = import_tensorflow().config.list_physical_devices("GPU")
        name = gpus[0].name if gpus else None
    elif backend == "torch":
        import torch

        name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    else:
        import jax

        name = next((d.device_kind for d in jax.devices() if d.platform == "gpu"), None)
    cpu = f"{os.cpu_count()} CPU cores"
    return f"{name} ({cpu}), Keras on {backend}" if name else f"CPU ({cpu}), Keras on {backend}"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    sys.exit(main())
