"""Car filter inference: our pipeline vs. the seed-style Keras loop, same images, one run.

    python -m bench.car_filter [--n 300] [--photo-size 1024x768] [--image-size 224]
                               [--alpha 1.0] [--batch-size 64] [--images DIR]

- seed style: ``keras.utils.image_dataset_from_directory`` (full-size decode + bilinear
  resize, AUTOTUNE) + ``model.predict``;
- ours (``tasks.car_filter.predict_ids``): bytes read from storage in a thread pool,
  JPEG decode at the largest DCT scale that still covers the input size, parallel
  resize, batch, prefetch, one compiled forward pass (fp16 + large batches on a GPU).

Both run the same model (``models.car_filter.build_car_filter``, random weights: the
speed does not depend on them) over the same images. The photos are demo-marketplace
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
    from carflow.demo_site.generate import generate_site

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


def _compare(label, model, ours_model, work, store, ids, size, bs, ours_bs, repeats, predict_ids) -> None:
    tf = import_tensorflow()

    def seed_style():
        ds = tf.keras.utils.image_dataset_from_directory(
            work / "flat", labels=None, image_size=(size, size), batch_size=bs, shuffle=False, verbose=False
        )
        return model.predict(ds, verbose=0)[:, 0]

    def ours():
        return predict_ids(ours_model, store, ids, size, ours_bs)

    seed_style(), ours()  # warm up: tracing, file cache
    names = ("seed style (image_dataset_from_directory + predict)", "ours (tasks.car_filter.predict_ids)")
    timings: dict[str, list[float]] = {name: [] for name in names}
    outputs = {}
    for _ in range(repeats):
        for name, fn in zip(names, (seed_style, ours), strict=True):
            t = time.monotonic()
            outputs[name] = fn()
            timings[name].append(time.monotonic() - t)
    n = len(ids)
    rates = {name: n / min(ts) for name, ts in timings.items()}
    print(f"[{label}]")
    for name, rate in rates.items():
        print(f"  {name:55s} {rate:8.1f} img/s  ({min(timings[name]):.2f}s for {n})")
    a, b = outputs.values()
    seed_rate, our_rate = rates.values()
    print(f"  ratio ours / seed style: {our_rate / seed_rate:.2f}x  (target >= 1.5x); "
          f"max |output difference| {float(abs(a - b).max()):.3f}")


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

    from carflow.storage import LocalStorage
    from models.car_filter import build_car_filter, for_inference
    from tasks.car_filter import has_gpu, predict_ids

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
        print(f"device: {device}; input {size}px; batch size: seed {bs}, ours {ours_bs}")
        full = build_car_filter("none", size, args.alpha)
        # the input pipeline alone: a model that costs nothing (what a GPU leaves of the work)
        inp = tf.keras.Input((size, size, 3))
        tiny = tf.keras.Model(inp, tf.keras.layers.Dense(1)(tf.keras.layers.GlobalAveragePooling2D()(inp)))
        for label, model in ((f"MobileNetV2 alpha={args.alpha}", full), ("input pipeline only", tiny)):
            _compare(label, model, for_inference(model, size, args.alpha) if model is full else model,
                     work, store, ids, size, bs, ours_bs, args.repeats, predict_ids)
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
