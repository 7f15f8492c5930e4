"""Detector throughput: the seeds' one-image-at-a-time loop vs. our streamed batches.

    YOLO_OFFLINE=1 python -m bench.detect [--images 200] [--batch 16] [--imgsz 640]
                                          [--weights yolov5nu.yaml] [--keep-all]

Both sides run the same model (default: random-init ``yolov5nu.yaml``, whose inference
cost is that of trained weights; ``--weights`` takes a real ``.pt``) over the same
generated car photos (JPEG files on disk / in a local storage), in one run:

* seeds: ``for path in paths: r = model(path)`` → largest box → PIL open/crop/save
  (ultralytics' defaults: on a CPU, ``cpu_count - 1`` torch threads, fp32);
* carflow: :func:`tasks.crop.crop_images` (threaded decode + letterbox, batches of one
  letterbox shape, one direct forward pass per batch, crops stored content-addressed),
  timed in three configurations so that the sources of the gain are visible:
  fp32 on 1 thread (batching and threading of the I/O only), fp32 on every core, and the
  default (``crop.precision=auto``: bf16 on an AMX CPU, fp16 on CUDA).

The default filter is the production one (car + truck, conf 0.25); random weights then
detect nothing, so no crop is encoded on either side. ``--keep-all`` counts every class
at conf 0 so that both sides really crop and encode (and both pay a large NMS).
The ratio printed is best-of-``--repeats`` img/s over the seeds' best-of-repeats.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path


def make_images(n: int, size: tuple[int, int], out: Path) -> list[Path]:
    import numpy as np

    from demo.render import CAR_STYLES, jpeg, render_car

    styles = list(CAR_STYLES.values())
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        r = render_car(styles[i % len(styles)], size, rng)
        p = out / f"img_{i:05d}.jpg"
        p.write_bytes(jpeg(r.image, quality=90))
        paths.append(p)
    return paths


def seeds_loop(model, paths: list[Path], out: Path, imgsz: int, conf: float, classes: list[int] | None) -> int:
    """The seed scripts' shape: one ``model(path)`` call per image."""
    from PIL import Image

    n = 0
    for p in paths:
        r = model(str(p), imgsz=imgsz, conf=conf, classes=classes, verbose=False)[0]
        if len(r.boxes):
            xyxy = r.boxes.xyxy.cpu().numpy()
            area = (xyxy[:, 2] - xyxy[:, 0]) * (xyxy[:, 3] - xyxy[:, 1])
            x0, y0, x1, y1 = (int(v) for v in xyxy[area.argmax()])
            with Image.open(p) as im:
                im.crop((x0, y0, x1, y1)).save(out / p.name, quality=95)
            n += 1
    return n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.detect", description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--batch", default="8,16", help="batch size(s), comma separated: each is timed")
    ap.add_argument("--imgsz", type=int, default=640)
    ap.add_argument("--size", default="640x480", help="photo size WxH")
    ap.add_argument("--workers", type=int, default=4, help="decode threads")
    ap.add_argument("--device", default="", help="torch device ('' = first GPU, else CPU)")
    ap.add_argument("--weights", default="yolov5nu.yaml", help="crop.weights (default: random init)")
    ap.add_argument("--keep-all", action="store_true", help="every class at conf 0 (random weights crop too)")
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args(argv)

    os.environ.setdefault("YOLO_OFFLINE", "1")
    from models.detector import (
        configure_ultralytics,
        load_detector,
        resolve_device,
        resolve_precision,
    )

    configure_ultralytics()
    import torch

    from carflow.settings import CropSettings
    from carflow.storage import LocalStorage
    from tasks.crop import crop_images

    w, h = (int(v) for v in a.size.lower().split("x"))
    keep = list(range(80)) if a.keep_all else [2, 7]
    conf = 0.0 if a.keep_all else 0.25
    device = resolve_device(a.device)
    auto = resolve_precision("auto", device)
    with tempfile.TemporaryDirectory(prefix="carflow-bench-detect-") as tmp:
        tmpd = Path(tmp)
        (tmpd / "img").mkdir()
        (tmpd / "seed_out").mkdir()
        t0 = time.perf_counter()
        paths = make_images(a.images, (w, h), tmpd / "img")
        store = LocalStorage(tmpd / "store")
        ids = [store.put_image(p.read_bytes()) for p in paths]
        print(f"generated {len(paths)} photos {w}x{h} in {time.perf_counter() - t0:.1f}s")

        model = load_detector(a.weights, cache=False)
        base = {"weights": a.weights, "imgsz": a.imgsz, "conf": conf, "keep_classes": keep,
                "decode_workers": a.workers, "device": a.device, "min_side": 1}
        variants = []
        for b in (int(v) for v in a.batch.split(",")):
            if device == "cpu":
                variants.append((f"batch {b:3d}, fp32, 1 thread", CropSettings(**base, batch_size=b, precision="fp32",
                                                                            torch_threads=1)))
                variants.append((f"batch {b:3d}, fp32, all cores", CropSettings(**base, batch_size=b,
                                                                             precision="fp32")))
            variants.append((f"batch {b:3d}, {auto} (auto)", CropSettings(**base, batch_size=b)))
        # warm up both call shapes (first-call fuse/setup is not what we measure)
        seeds_loop(model, paths[:2], tmpd / "seed_out", a.imgsz, conf, keep)
        for _, cfg in variants:
            crop_images(store, ids[: cfg.batch_size], model, cfg)
        seed_threads = torch.get_num_threads()

        t_seed, n_seed = float("inf"), 0
        ours = {name: (float("inf"), 0) for name, _ in variants}
        for r in range(a.repeats):
            t0 = time.perf_counter()
            n_seed = seeds_loop(model, paths, tmpd / "seed_out", a.imgsz, conf, keep)
            t_seed = min(t_seed, time.perf_counter() - t0)
            for name, cfg in variants:
                store2 = LocalStorage(tmpd / f"store-{r}-{abs(hash(name))}")  # fresh: every crop is written
                for p in paths:
                    store2.put_image(p.read_bytes())
                t0 = time.perf_counter()
                rows = crop_images(store2, ids, model, cfg)
                ours[name] = (min(ours[name][0], time.perf_counter() - t0),
                              sum(row["crop_id"] is not None for row in rows))

    print(f"device={device} cpus={os.cpu_count()} amx_bf16={device == 'cpu' and auto == 'bf16'} imgsz={a.imgsz} "
          f"decode_workers={a.workers} images={a.images} weights={a.weights} "
          f"filter={'all classes, conf 0' if a.keep_all else 'car+truck, conf 0.25'}")
    print(f"seeds   model(path) loop ({seed_threads} torch thread(s), fp32): {a.images / t_seed:7.2f} img/s  "
          f"({t_seed:.1f}s, {n_seed} crops)")
    for name, (t, n) in ours.items():
        print(f"carflow {name:32s}: {a.images / t:7.2f} img/s  ({t:.1f}s, {n} crops)  ratio {t_seed / t:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
