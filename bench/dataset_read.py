"""Training input: read throughput of dataset layouts, side by side in one run.

    python -m bench.dataset_read [--n 2000] [--size 224] [--batch-size 64]
                                 [--shard-images 256] [--repeats 2] [--classes 6]

Builds ``--n`` crops the way the crop stage makes them (a demo-marketplace car render at
``--photo-size``, default 1024×768 like marketplace photos, cut around the car's box with
a random margin, JPEG quality 95: the car spans 30–80 % of the photo width) and stores them in one or several layouts, then times a training input
pipeline over each — every pipeline yields decoded, resized ``size×size`` uint8 batches
and int labels:

(a)  the seeds' folder layout ``train/<class>/<id>.jpg`` (``tasks.export.export_folders``)
     read with ``keras.utils.image_dataset_from_directory`` (+ a uint8 cast);
(b)  the same folders read with a hand-written tf.data pipeline (``list_files`` →
     parallel read/decode/resize → batch → prefetch);
(c0) TFRecord shards of the crops as stored (``tasks.export.export_tfrecords`` with no
     resize) read with ``tasks.export.tfrecord_dataset`` (interleave, parallel decode,
     prefetch): the container alone;
(c1) TFRecord shards of JPEGs pre-resized at export to a shorter side of ``size``,
     aspect kept (``fit="shorter"``), same reader;
(c)  TFRecord shards of JPEGs pre-resized at export to ``size``×``size`` (``fit="square"``:
     the export ``flows/dataset.py`` writes by default), same reader;
(c2) the same shards read without TensorFlow's reader: ``ExportIndex.examples``
     (``tasks.tfrecord``: pure-Python framing + protobuf) and
     ``carflow.imageio.decode_square`` (as training decodes) on a thread pool, batched in
     NumPy — the path of Keras on the torch/JAX backends (wrapped in ``from_generator``
     here only to be timed like the others);
(d)  sharded uint8 ``.npy`` arrays ``[k, size, size, 3]`` (no decode at all), read by
     memory-mapping each shard.

Each layout is read once to warm up (page cache, tracing) and then ``--repeats`` times,
interleaved; the best pass counts. Prints img/s, the ratio to (a), and the bytes per
image on disk (file sizes, and blocks allocated: one small file per image wastes part
of a block). Every pipeline must yield all ``--n`` images with the same labels, or the
bench fails. The files are read from the page cache: this measures the decode and
pipeline cost, what remains when storage keeps up. ``--threads 1`` gives every pipeline
one thread: per-core costs, less sensitive to other load on the machine.
"""

from __future__ import annotations

import argparse
import functools
import gc
import io
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

from carflow.frameworks import import_keras, import_tensorflow


def make_crops(n: int, n_classes: int, photo: tuple[int, int] = (1024, 768), seed: int = 0) -> list[tuple[str, bytes]]:
    """``n`` (class, JPEG crop) pairs: car renders cut around their box, random margins."""
    from demo.render import CAR_STYLES, jpeg, render_car

    rng = np.random.default_rng(seed)
    styles = list(CAR_STYLES.items())[:n_classes]
    bases = []  # a few renders per class, many crops of each
    per_class = max(2, min(20, n // (4 * n_classes)))
    for k in range(per_class * len(styles)):
        name, style = styles[k % len(styles)]
        bases.append((name.replace("/", "_"), render_car(style, photo, rng)))
    out = []
    for i in range(n):
        cls, shot = bases[i % len(bases)]
        x0, y0, x1, y1 = shot.bbox
        w, h = x1 - x0, y1 - y0
        m = rng.uniform(0.03, 0.15, 4) * np.array([w, h, w, h])
        box = (max(0, int(x0 - m[0])), max(0, int(y0 - m[1])), min(photo[0], int(x1 + m[2])), min(photo[1], int(y1 + m[3])))
        crop = shot.image.crop(box)
        if rng.random() < 0.5:
            crop = crop.transpose(0)  # FLIP_LEFT_RIGHT
        out.append((cls, jpeg(crop, quality=95)))
    return out


def _disk(paths: list[Path]) -> tuple[float, float]:
    """(bytes, allocated bytes) of ``paths`` in total."""
    st = [p.stat() for p in paths]
    return float(sum(s.st_size for s in st)), float(sum(s.st_blocks * 512 for s in st))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.dataset_read", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2000, help="images")
    parser.add_argument("--size", type=int, default=224, help="training image size (size×size)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--shard-images", type=int, default=256, help="images per TFRecord / .npy shard")
    parser.add_argument("--repeats", type=int, default=2, help="timed passes of each layout (best is reported)")
    parser.add_argument("--classes", type=int, default=6)
    parser.add_argument("--photo-size", default="1024x768", help="size WxH of the photos the crops are cut from")
    parser.add_argument("--no-npy", action="store_true", help="skip layout (d)")
    parser.add_argument("--threads", type=int, default=0,
                        help="tf.data threads for every pipeline (0: all cores); 1 compares per-core cost, "
                             "robust to other load on the machine")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    tf = import_tensorflow()
    keras = import_keras()
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    from carflow.imageio import decode_square
    from carflow.keys import image_key
    from carflow.storage import LocalStorage
    from tasks.export import (
        export_folders,
        export_tfrecords,
        open_export,
        resize_jpeg,
        tfrecord_dataset,
    )

    size, bs, n = args.size, args.batch_size, args.n
    auto = tf.data.AUTOTUNE
    work = Path(tempfile.mkdtemp(prefix="carflow-bench-read-"))
    try:
        t = time.monotonic()
        photo = tuple(int(v) for v in args.photo_size.lower().split("x"))
        crops = make_crops(n, args.classes, photo)
        store = LocalStorage(work / "store")
        import pandas as pd

        ids = [store.put_image(data) for _, data in crops]
        df = pd.DataFrame({"split": "train", "class_label": [c for c, _ in crops], "train_image_id": ids,
                           "image_id": ids, "listing_id": [f"b:{i}" for i in range(n)], "status": "kept"})
        classes = sorted(df["class_label"].unique())
        doc = {"version": "bench", "classes": classes}
        want = Counter(df["class_label"].map(classes.index))
        dims = np.array([Image.open(store.root / image_key(i)).size for i in ids[:200]])
        print(f"{n} crops ({len(classes)} classes), mean {dims[:, 0].mean():.0f}x{dims[:, 1].mean():.0f} px, "
              f"{np.mean([len(d) for _, d in crops]) / 1024:.1f} KiB; generated in {time.monotonic() - t:.1f}s")
        print(f"TensorFlow {tf.__version__}, {os.cpu_count()} cores, "
              f"{'GPU' if tf.config.list_physical_devices('GPU') else 'CPU only'}; size {size}, batch {bs}, "
              f"tf.data threads {args.threads or 'all'}; load average {os.getloadavg()[0]:.1f}")
        workers = os.cpu_count() or 2

        # -- layouts -------------------------------------------------------------------
        prep: dict[str, str] = {}
        folders = LocalStorage(work / "folders")
        t = time.monotonic()
        export_folders(df, store, folders, max_workers=workers)
        prep["folders"] = f"{time.monotonic() - t:.1f}s"
        tfr = {"as stored": (work / "tfr_full", 1 << 30, "shorter"), "shorter side": (work / "tfr_short", size, "shorter"),
               "square": (work / "tfr", size, "square")}
        for what, (dest, s, fit) in tfr.items():
            t = time.monotonic()
            export_tfrecords(df, store, doc, size=s, fit=fit, shard_images=args.shard_images,
                             max_workers=workers, dest=LocalStorage(dest))
            prep[f"TFRecord {what}"] = f"{time.monotonic() - t:.1f}s ({n / (time.monotonic() - t):.0f} img/s)"
        npy = work / "npy"
        if not args.no_npy:
            npy.mkdir()
            t = time.monotonic()
            for k in range(0, n, args.shard_images):
                part = crops[k:k + args.shard_images]
                arr = np.stack([np.asarray(Image.open(io.BytesIO(resize_jpeg(d, size)[0])).convert("RGB")
                                           .resize((size, size), Image.Resampling.BILINEAR)) for _, d in part])
                np.save(npy / f"train-{k // args.shard_images:05d}.images.npy", arr)
                np.save(npy / f"train-{k // args.shard_images:05d}.labels.npy",
                        np.array([classes.index(c) for c, _ in part], np.int64))
            prep["npy"] = f"{time.monotonic() - t:.1f}s"

        # -- readers -------------------------------------------------------------------
        def to_uint8(x, y):
            return tf.saturate_cast(tf.round(x), tf.uint8), y

        def seed_style():
            ds = keras.utils.image_dataset_from_directory(
                work / "folders" / "train", labels="inferred", label_mode="int", class_names=classes,
                image_size=(size, size), batch_size=bs, shuffle=False, verbose=False)
            return ds.map(to_uint8, num_parallel_calls=auto).prefetch(auto)

        table = tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(tf.constant(classes), tf.range(len(classes), dtype=tf.int64)), -1)

        def folder_pipeline(root: Path):
            def load(path):
                label = table.lookup(tf.strings.split(path, os.sep)[-2])
                img = tf.io.decode_jpeg(tf.io.read_file(path), channels=3)
                return tf.saturate_cast(tf.round(tf.image.resize(img, (size, size))), tf.uint8), label

            def make():
                files = tf.data.Dataset.list_files(str(root / "train" / "*" / "*.jpg"), shuffle=False)
                return files.map(load, num_parallel_calls=auto).batch(bs).prefetch(auto)

            return make

        def npy_pipeline():
            shards = sorted(npy.glob("*.images.npy"))

            def gen():
                for s in shards:
                    images = np.load(s, mmap_mode="r")
                    labels = np.load(str(s).replace(".images.", ".labels."))
                    for k in range(0, len(labels), bs):
                        yield np.ascontiguousarray(images[k:k + bs]), labels[k:k + bs]

            sig = (tf.TensorSpec((None, size, size, 3), tf.uint8), tf.TensorSpec((None,), tf.int64))
            return tf.data.Dataset.from_generator(gen, output_signature=sig).prefetch(auto)

        folder_files = sorted((work / "folders").rglob("*.jpg"))
        layouts = {
            "(a)  folders, image_dataset_from_directory": (seed_style, folder_files),
            "(b)  folders, tf.data list_files + parallel decode": (folder_pipeline(work / "folders"), folder_files),
        }
        for name, what in (("(c0) TFRecord, crops as stored", "as stored"),
                           ("(c1) TFRecord, JPEGs shorter side = size", "shorter side"),
                           ("(c)  TFRecord, JPEGs size x size (our export)", "square")):
            root = tfr[what][0]
            layouts[name] = (lambda root=root: tfrecord_dataset(root, "train", size, bs, dataset_version="bench"),
                             sorted(root.rglob("*.tfrecord")))

        def tf_free_pipeline():
            index = open_export(tfr["square"][0], "bench")
            pool = ThreadPoolExecutor(args.threads or workers)

            decode = functools.partial(decode_square, size=size)  # as training's TF-free reader decodes

            def gen():
                batch: list = []
                for ex in index.examples("train"):
                    batch.append(ex)
                    if len(batch) == bs:
                        yield np.stack(list(pool.map(decode, [e["image"] for e in batch]))), \
                            np.array([e["label"] for e in batch], np.int64)
                        batch = []
                if batch:
                    yield np.stack(list(pool.map(decode, [e["image"] for e in batch]))), \
                        np.array([e["label"] for e in batch], np.int64)

            sig = (tf.TensorSpec((None, size, size, 3), tf.uint8), tf.TensorSpec((None,), tf.int64))
            return tf.data.Dataset.from_generator(gen, output_signature=sig).prefetch(auto)

        layouts["(c2) our export, TF-free reader + decode_square"] = (tf_free_pipeline,
                                                                    sorted(tfr["square"][0].rglob("*.tfrecord")))
        if not args.no_npy:
            layouts["(d)  sharded uint8 .npy arrays, memory-mapped"] = (npy_pipeline, sorted(npy.glob("*.npy")))

        def one_pass(make) -> float:
            seen: Counter = Counter()
            # the previous pipeline's iterator and threads go first: left to the garbage
            # collector they slow whichever pipeline runs next (measured: ~0.55x)
            gc.collect()
            time.sleep(0.3)
            ds = make()
            if args.threads:
                opts = tf.data.Options()
                opts.threading.private_threadpool_size = args.threads
                opts.threading.max_intra_op_parallelism = 1
                ds = ds.with_options(opts)
            t0 = time.monotonic()
            for images, labels in ds:
                assert images.dtype == tf.uint8 and tuple(images.shape[1:]) == (size, size, 3)
                seen.update(labels.numpy().tolist())
            dt = time.monotonic() - t0
            if seen != want:
                raise AssertionError(f"wrong images/labels: {sorted(seen.items())} != {sorted(want.items())}")
            return dt

        timings: dict[str, list[float]] = {name: [] for name in layouts}
        for make, _ in layouts.values():
            one_pass(make)  # warm up
        for _ in range(args.repeats):
            for name, (make, _) in layouts.items():
                timings[name].append(one_pass(make))

        print("prepared (export time): " + ", ".join(f"{k} {v}" for k, v in prep.items()))
        rates = {name: n / min(ts) for name, ts in timings.items()}
        base = rates["(a)  folders, image_dataset_from_directory"]
        print(f"{'layout':52s} {'img/s':>8s} {'vs (a)':>7s} {'bytes/img':>10s} {'alloc/img':>10s}")
        for name, (_, files) in layouts.items():
            size_b, alloc = _disk(files)
            print(f"{name:52s} {rates[name]:8.0f} {rates[name] / base:6.2f}x {size_b / n:10.0f} {alloc / n:10.0f}")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
