"""Detector throughput: the seeds' one-image-at-a-time loop vs. our streamed batches.

    YOLO_OFFLINE=1 python -m bench.detect [--images 200] [--batch 16] [--imgsz 640]

Both sides run the same random-init ``yolov5nu.yaml`` model (the inference cost is that of
trained weights) over the same generated car photos (JPEG files on disk / in a local
storage), in one run, and both end with the crop JPEG written:

* seeds: ``for path in paths: r = model(path)`` → largest box → PIL open/crop/save;
* carflow: :func:`tasks.crop.crop_images` (threaded decode, fixed-size batches of arrays,
  one ``model.predict(list_of_arrays)`` per batch, crops stored content-addressed).

With random weights nothing is a vehicle, so ``--keep-all`` (default on) counts every
class and sets conf=0 so that both sides really crop and encode.
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

    from carflow.demo_site.render import CAR_STYLES, jpeg, render_car

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
    ap.add_argument("--batch", default="16", help="batch size(s), comma separated: each is timed")
    ap.add_argument("--imgsz", type=int, default=640)
    ap.add_argument("--size", default="640x480", help="photo size WxH")
    ap.add_argument("--workers", type=int, default=4, help="decode threads")
    ap.add_argument("--device", default="", help="torch device ('' = ultralytics default)")
    ap.add_argument("--vehicles-only", action="store_true", help="real filter (classes 2,7, conf .25)")
    a = ap.parse_args(argv)

    os.environ.setdefault("YOLO_OFFLINE", "1")
    from models.detector import configure_ultralytics, load_detector

    configure_ultralytics()
    import torch

    from carflow.settings import CropSettings
    from carflow.storage import LocalStorage
    from tasks.crop import crop_images

    w, h = (int(v) for v in a.size.lower().split("x"))
    keep = [2, 7] if a.vehicles_only else list(range(80))
    conf = 0.25 if a.vehicles_only else 0.0
    with tempfile.TemporaryDirectory(prefix="carflow-bench-detect-") as tmp:
        tmpd = Path(tmp)
        (tmpd / "img").mkdir()
        (tmpd / "seed_out").mkdir()
        t0 = time.perf_counter()
        paths = make_images(a.images, (w, h), tmpd / "img")
        store = LocalStorage(tmpd / "store")
        ids = [store.put_image(p.read_bytes()) for p in paths]
        print(f"generated {len(paths)} photos {w}x{h} in {time.perf_counter() - t0:.1f}s")

        model = load_detector("yolov5nu.yaml", cache=False)
        batches = [int(b) for b in a.batch.split(",")]
        cfgs = {b: CropSettings(weights="yolov5nu.yaml", batch_size=b, imgsz=a.imgsz, conf=conf, keep_classes=keep,
                                decode_workers=a.workers, device=a.device, min_side=1) for b in batches}
        # warm up both call shapes (first-call fuse/setup is not what we measure)
        seeds_loop(model, paths[:2], tmpd / "seed_out", a.imgsz, conf, keep)
        crop_images(store, ids[: max(batches)], model, cfgs[max(batches)])

        t0 = time.perf_counter()
        n_seed = seeds_loop(model, paths, tmpd / "seed_out", a.imgsz, conf, keep)
        t_seed = time.perf_counter() - t0

        ours = {}
        for b, cfg in cfgs.items():
            store2 = LocalStorage(tmpd / f"store-b{b}")  # fresh: every crop is encoded and written
            for p in paths:
                store2.put_image(p.read_bytes())
            t0 = time.perf_counter()
            rows = crop_images(store2, ids, model, cfg)
            ours[b] = (time.perf_counter() - t0, sum(r["crop_id"] is not None for r in rows))

    device = str(next(model.model.parameters()).device)
    print(f"device={device} torch_threads={torch.get_num_threads()} cpus={os.cpu_count()} imgsz={a.imgsz} "
          f"decode_workers={a.workers} images={a.images} model=yolov5nu (random init)")
    print(f"seeds   model(path) loop      : {a.images / t_seed:7.2f} img/s  ({t_seed:.1f}s, {n_seed} crops)")
    for b, (t, n) in ours.items():
        print(f"carflow batches of {b:3d} arrays: {a.images / t:7.2f} img/s  ({t:.1f}s, {n} crops)  "
              f"ratio {t_seed / t:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
