"""Car filter inference: our pipeline vs. the seed-style Keras loop, same images, one run.

    python -m bench.car_filter [--n 300] [--photo-size 1024x768] [--image-size 224]
                               [--alpha 1.0] [--batch-size 64] [--images DIR]

- seed style: ``keras.utils.image_dataset_from_directory`` (full-size decode + bilinear
  resize, AUTOTUNE) + ``model.predict``;
- ours (``tasks.car_filter.predict_ids`` with ``models.car_filter.CarFilterPredictor``):
  bytes read from storage in a thread pool,
  JPEG decode at the largest DCT scale that still covers the input size, parallel
  resize, batch, prefetch, then the forward pass in the runtime ``car_filter.runtime=auto``
  picks: OpenVINO fp32 on a CPU, Keras fp16 + large batches on a GPU (and, on an AMX
  CPU, the opt-in OpenVINO bf16).
  Also timed: ours with the seeds' runtime (Keras fp32), to separate the input
  pipeline's share of the gain from the runtime's.

Both run the same model (``models.car_filter.build_car_filter``, random weights with
settled BN statistics and a random head, so outputs differ per image; the speed does not
depend on the weights) over the same images. The photos are demo-marketplace
renders at ``--photo-size`` (marketplace photos are ~1024 px wide), or the JPEGs of
``--images``. Prints img/s of each, the ratio, batch size and device.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from carflow.frameworks import import_tensorflow


def _photos(args, work: Path) -> list[Path]:
    if args.images:
        files = sorted(p for p in Path(args.images).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))
        return files[: args.n]
    from demo.generate import generate_site

    w, h = (int(v) for v in args.photo_size.lower().split("x"))
    site = work / "site"
    n_listings = max(12, args.n // 4 + 4)
    generate_site(site, seed=0, n_listings=n_listings, image_size=(w, h))
    files = sorted(p for p in (site / "img").glob("*.jpg") if p.stat().st_size > 0)
    good = []
    from PIL import Image

    for p in files:  # only clean JPEGs (the site also plants broken files)
        try:
            with Image.open(p) as im:
                if im.format == "JPEG" and im.mode == "RGB" and min(im.size) >= 48:
                    im.load()
                    good.append(p)
        except Exception:  # noqa: BLE001
            continue
        if len(good) >= args.n:
            break
    return good


def _compare(label, model, ours_models, work, store, ids, size, bs, ours_bs, repeats, predict_ids) -> None:
    """Time the seed-style loop against each of ``ours_models`` (name → model), alternating
    runs; report best-of-``repeats`` img/s, the ratio and the max output difference."""
    tf = import_tensorflow()

    def seed_style():
        ds = tf.keras.utils.image_dataset_from_directory(
            work / "flat", labels=None, image_size=(size, size), batch_size=bs, shuffle=False, verbose=False
        )
        return model.predict(ds, verbose=0)[:, 0]

    runs = {"seed style (image_dataset_from_directory + predict)": seed_style}
    for name, m in ours_models.items():
        runs[f"ours, {name}"] = lambda m=m: predict_ids(m, store, ids, ours_bs)
    for fn in runs.values():  # warm up: tracing, compilation, file cache
        fn()
    timings: dict[str, list[float]] = {name: [] for name in runs}
    outputs = {}
    for _ in range(repeats):
        for name, fn in runs.items():
            t = time.monotonic()
            outputs[name] = fn()
            timings[name].append(time.monotonic() - t)
    n = len(ids)
    rates = {name: n / min(ts) for name, ts in timings.items()}
    seed_name = next(iter(runs))
    print(f"[{label}]")
    for name, rate in rates.items():
        extra = "" if name == seed_name else (
            f"  ratio {rate / rates[seed_name]:.2f}x (target >= 1.5x); "
            f"max |p difference| {float(abs(outputs[name] - outputs[seed_name]).max()):.4f}")
        print(f"  {name:55s} {rate:8.1f} img/s  ({min(timings[name]):.2f}s for {n}){extra}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.car_filter", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=300, help="images")
    parser.add_argument("--photo-size", default="1024x768", help="demo photo size WxH")
    parser.add_argument("--images", help="a folder of JPEGs instead of demo photos")
    parser.add_argument("--image-size", type=int, default=224, help="model input (car_filter.image_size)")
    parser.add_argument("--alpha", type=float, default=1.0, help="MobileNetV2 width (car_filter.alpha)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each (best is reported)")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    tf = import_tensorflow()

    from carflow.frameworks import cpu_has_fast_bf16
    from carflow.storage import LocalStorage
    from models.car_filter import (
        CarFilterPredictor,
        build_car_filter,
        for_runtime,
        has_gpu,
        resolve_runtime,
        spread_random_init,
    )
    from tasks.car_filter import predict_ids

    work = Path(tempfile.mkdtemp(prefix="carflow-bench-cf-"))
    try:
        t = time.monotonic()
        files = _photos(args, work)
        flat = work / "flat" / "all"
        flat.mkdir(parents=True)
        store = LocalStorage(work / "store")
        ids = []
        total_bytes = 0
        for i, p in enumerate(files):
            data = p.read_bytes()
            total_bytes += len(data)
            (flat / f"{i:06d}.jpg").write_bytes(data)
            ids.append(store.put_image(data))
        print(f"{len(files)} JPEGs, {total_bytes / len(files) / 1024:.0f} KiB avg, prepared in "
              f"{time.monotonic() - t:.1f}s")

        gpu = has_gpu()
        device = (tf.config.list_physical_devices("GPU")[0].name if gpu else "CPU") + f", {os.cpu_count()} cores"
        size, bs = args.image_size, args.batch_size
        ours_bs = max(bs, 512) if gpu else bs
        runtime, precision = resolve_runtime("auto", "auto")
        print(f"device: {device}; input {size}px; batch size: seed {bs}, ours {ours_bs}; "
              f"car_filter.runtime=auto → {runtime}, precision {precision}")
        full = build_car_filter("none", size, args.alpha)
        spread_random_init(full)
        ours = {"keras fp32 (our input pipeline only)": CarFilterPredictor(full),
                f"{runtime} {precision} (the default)": CarFilterPredictor(
                    for_runtime(full, runtime, precision, args.alpha), runtime, precision)}
        if runtime == "openvino" and cpu_has_fast_bf16():
            ours["openvino bf16 (opt-in: p_car drifts)"] = CarFilterPredictor(
                for_runtime(full, "openvino", "bf16", args.alpha), "openvino", "bf16")
        _compare(f"MobileNetV2 alpha={args.alpha}", full, ours, work, store, ids, size, bs, ours_bs,
                 args.repeats, predict_ids)
        # the input pipeline alone: a model that costs nothing (what a GPU leaves of the work)
        inp = tf.keras.Input((size, size, 3))
        tiny = tf.keras.Model(inp, tf.keras.layers.Dense(1)(tf.keras.layers.GlobalAveragePooling2D()(inp)))
        _compare("input pipeline only (a model that costs nothing)", tiny, {"keras": CarFilterPredictor(tiny)},
                 work, store, ids,
                 size, bs, ours_bs, args.repeats, predict_ids)
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
