"""Classifier training throughput, measured side by side in one process.

CPU mode (default, ``KERAS_BACKEND=tensorflow``): the same model (``models/classifier.py``,
same architecture and recipe) on the same rendered demo crops, trained

* the seeds' way: ``keras.utils.image_dataset_from_directory`` over the exported folders
  (``tasks.export.export_folders``: crops as stored, decoded and resized every step) into
  ``model.fit`` with Keras' own layers, and
* our way, as ``python -m flows.train`` trains: the TFRecord export
  (``tasks.export.export_tfrecords``, JPEGs resized once at export) through
  ``tasks.train.tfdata_batches`` (interleave, parallel decode, shuffle, prefetch), with
  ``train.fast_layers`` (``models.fast_layers``: TensorFlow's fused BatchNorm kernel,
  which Keras 2, the seeds' Keras, called itself and Keras 3 does not, and 1x1
  convolutions as matmuls); ``--fast off``
  trains ours with Keras' own layers, to show the input's share alone;

then each input pipeline alone and the model alone with each kind of layer (one
in-memory batch repeated), to show which one is the bottleneck. Prints img/s and the
ratios.

The photos are rendered at 1024x768 (``--photo-size``): what marketplace photos are as
downloaded. The EU seed's 1.6 M photos weighed 187 GB, ~117 KB a JPEG, which is about
1024x768 for a real photo; autoscout24/mobile.de serve 800x600 to 1280x960. The seeds'
folders keep each crop at its stored resolution (here ~500x380 px), so their input
decodes and resizes that every step, while our export resizes once. 640x480 photos
(crops ~250x190) understated that cost. Both sides train the model with the settings
``TrainSettings`` resolves on this machine (precision, XLA), printed in the header.

GPU mode (``--backend torch`` or ``jax``; no TensorFlow is imported, none needs to be
installed): the model alone on in-memory uint8 batches at the requested backbone, size,
precision and batch (on torch with Keras' own layers and with ``models.fast_layers``
side by side, and the host syncs a step of each), plus the TensorFlow-free input path's
decode rate (``carflow.imageio.decode_square`` in a thread pool, as
``tasks.train.python_batches``) on random JPEGs of
that size; prints img/s, the ratios and the device name. On JAX ``--jit`` is the default
(its step without XLA runs op by op).

    python bench/train.py                                   # CPU, TensorFlow
    KERAS_BACKEND=torch python bench/train.py --backend torch --backbone efficientnetb1 \\
        --image-size 240 --precision bf16 --batch-size 512 [--cuda-graphs]  # one GPU, torch
    KERAS_BACKEND=jax python bench/train.py --backend jax --jit --backbone efficientnetb1 \\
        --image-size 240 --precision bf16 --batch-size 256  # one GPU, JAX
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import io
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", choices=["tensorflow", "torch", "jax"], default="tensorflow",
                   help="tensorflow: the CPU comparison with the seeds' input; torch/jax: the GPU mode")
    p.add_argument("--backbone", default=None, help="default: mobilenetv2 (CPU), efficientnetb1 (GPU)")
    p.add_argument("--alpha", type=float, default=0.35, help="MobileNetV2 width")
    p.add_argument("--image-size", type=int, default=None, help="default: 96 (CPU), 240 (GPU)")
    p.add_argument("--batch-size", type=int, default=None, help="default: 32 (CPU), 256 (GPU)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default=None,
                   help="default: what train.precision=auto picks on this machine (CPU), bf16 (GPU)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per measurement (default 30)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation)")
    p.add_argument("--listings", type=int, default=60, help="CPU mode: demo listings rendered")
    p.add_argument("--photo-size", default="1024x768",
                   help="CPU mode: rendered photo size, a marketplace photo as downloaded (crops are ~half)")
    p.add_argument("--jit", action=argparse.BooleanOptionalAction, default=None,
                   help="jit_compile (XLA on TF, torch.compile on torch); default: train.xla (CPU), off (GPU)")
    p.add_argument("--fast", choices=["both", "on", "off"], default="both",
                   help="GPU mode on torch: the model with Keras' own layers (off), with models.fast_layers (on), or both side by side; CPU mode: off trains ours with Keras' own layers too")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="GPU mode on torch: also the fast model with its whole step as one CUDA graph "
                        "(models.fast_layers.CudaGraphStep, train.cuda_graphs)")
    p.add_argument("--classes", type=int, default=100, help="GPU mode: outputs of the head")
    p.add_argument("--rounds", type=int, default=3,
                   help="CPU mode: alternating seeds/ours rounds, best of each (a shared machine's load varies)")
    a = p.parse_args(argv)
    gpu = a.backend != "tensorflow"
    a.backbone = a.backbone or ("efficientnetb1" if gpu else "mobilenetv2")
    a.image_size = a.image_size or (240 if gpu else 96)
    a.batch_size = a.batch_size or (256 if gpu else 32)
    a.precision = a.precision or ("bf16" if gpu else None)  # CPU: resolved in cpu_mode, as training does
    if a.backend == "jax" and a.jit is None:
        a.jit = True  # as training compiles on JAX: its step without XLA runs op by op
    a.steps = a.steps or 30
    a.warmup = max(1, a.warmup)
    return a


def recipe(a: argparse.Namespace) -> dict:
    """The model settings both sides train with (random init: every layer trains)."""
    return {"backbone": a.backbone, "alpha": a.alpha, "weights": "none", "image_size": a.image_size,
            "dropout": 0.2, "l2": 1e-5, "flip": True, "rotation": 0.05, "zoom": 0.1, "contrast": 0.1,
            "translation": 0.1}


def compiled_model(keras, a: argparse.Namespace, classes: int, fast: bool = False):
    """The classifier compiled as training compiles it; ``fast``: with
    :func:`models.fast_layers.accelerate` (fused layers on TensorFlow and torch)."""
    from carflow.settings import TrainSettings
    from models.augment import use_xla
    from models.classifier import build_classifier
    from models.fast_layers import accelerate
    from models.recipe import Phase, compile_for, lr_schedule

    keras.config.set_dtype_policy({"fp32": "float32", "bf16": "mixed_bfloat16", "fp16": "mixed_float16"}[a.precision])
    model = build_classifier(classes, recipe(a))
    if fast:
        accelerate(model)
    use_xla(model, bool(a.jit))  # as training: XLA has no kernel for TensorFlow's image warp
    # the recipe's loss, metric, optimizer (AdamW) and schedule (warmup, then cosine decay)
    cfg = TrainSettings(**recipe(a), xla=bool(a.jit), label_smoothing=0.1)
    compile_for(model, cfg, "multiclass", lr_schedule(cfg, Phase("full", 0, 100, cfg.learning_rate), 100))
    return model


def timed_fit(model, data, a: argparse.Namespace, fast: bool = False) -> float:
    """img/s of ``model.fit`` over ``a.steps`` steps after ``a.warmup`` untimed ones
    (``fast``: inside :func:`models.fast_layers.fast_fit`, as training runs it)."""
    from models.fast_layers import fast_fit

    with fast_fit() if fast else contextlib.nullcontext():
        model.fit(data, epochs=1, steps_per_epoch=a.warmup, verbose=0)
        t = time.perf_counter()
        model.fit(data, epochs=1, steps_per_epoch=a.steps, verbose=0)
        return a.steps * a.batch_size / (time.perf_counter() - t)


def steady_fit(keras, model, data, a: argparse.Namespace) -> float:
    """img/s of one ``model.fit`` call between the end of step ``a.warmup`` and the end of
    step ``a.warmup + a.steps``: the steady state of one running input pipeline, as in a
    training epoch (no pipeline start-up or shuffle-buffer fill in the timed window)."""
    gc.collect()  # the previous measurement's input iterator (its prefetch threads) goes first
    marks: list[float] = []

    class Clock(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            marks.append(time.perf_counter())

    model.fit(data, epochs=1, steps_per_epoch=a.warmup + a.steps, verbose=0, callbacks=[Clock()])
    return a.steps * a.batch_size / (marks[-1] - marks[a.warmup - 1])


def timed_iter(it, a: argparse.Namespace) -> float:
    """img/s of pulling ``a.steps`` batches from an iterator (after ``a.warmup``)."""
    for _ in range(a.warmup):
        next(it)
    t = time.perf_counter()
    n = 0
    for _ in range(a.steps):
        x = next(it)[0]
        n += len(x)
    return n / (time.perf_counter() - t)


def row(name: str, rate: float, base: float | None = None, note: str = "") -> None:
    ratio = f"{rate / base:6.2f}x" if base else "       "
    print(f"  {name:<58} {rate:9.1f} img/s {ratio}  {note}")


# ---------------------------------------------------------------------------------------
# CPU: the seeds' input vs ours, same model, same images
# ---------------------------------------------------------------------------------------
def cpu_mode(a: argparse.Namespace) -> None:
    import numpy as np
    import pandas as pd

    from carflow.frameworks import import_keras, import_tensorflow
    from carflow.storage import open_storage
    from demo.generate import generate_site
    from tasks.export import export_folders, export_tfrecords, open_export
    from tasks.train import Feed, python_batches, tfdata_batches

    tf = import_tensorflow()
    keras = import_keras()
    from PIL import Image

    from carflow.settings import TrainSettings
    from tasks.train import setup_runtime

    defaults = TrainSettings()  # what `python -m flows.train` trains with here; both sides use it
    a.precision = a.precision or setup_runtime(defaults).precision
    a.jit = defaults.xla if a.jit is None else a.jit

    w, h = (int(v) for v in a.photo_size.split("x"))
    with tempfile.TemporaryDirectory(prefix="carflow-bench-train-") as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        gt = generate_site(tmp / "site", seed=0, n_listings=a.listings, n_classes=6, image_size=(w, h),
                           label_problems=False)
        store = open_storage(str(tmp / "store"))
        rows = []
        for lst in gt["listings"]:
            for p in lst["photos"]:
                if lst["label"] and p["is_car"] and p["problem"] is None:
                    crop = Image.open(tmp / "site" / p["url"].lstrip("/")).convert("RGB").crop(tuple(p["bbox"]))
                    buf = io.BytesIO()
                    crop.save(buf, "JPEG", quality=92)
                    image_id = store.put_image(buf.getvalue())
                    rows.append({"split": "train", "class_label": lst["class_key"], "train_image_id": image_id,
                                 "image_id": image_id, "listing_id": lst["listing_id"], "status": "kept"})
        df = pd.DataFrame(rows).drop_duplicates("train_image_id")
        classes = sorted(df["class_label"].unique())
        export_folders(df, store, open_storage(str(tmp / "folders")))
        export_tfrecords(df, store, {"version": "bench", "classes": classes}, size=a.image_size, shard_images=256)
        store.put("datasets/latest.json", b'{"version": "bench"}')
        index = open_export(store)
        sizes = np.array([Image.open(f).size for f in (tmp / "folders" / "train").rglob("*.jpg")])
        print(f"data: {len(df)} demo crops of {len(classes)} classes (mean {sizes[:, 0].mean():.0f}x"
              f"{sizes[:, 1].mean():.0f} px as stored), prepared in {time.perf_counter() - t:.0f}s")
        print(f"model: {a.backbone} (alpha {a.alpha}) at {a.image_size}px, random init, every layer training, "
              f"batch {a.batch_size}, {a.precision}{', XLA' if a.jit else ''}; Keras {keras.__version__} on {keras.backend.backend()}, "
              f"{os.cpu_count()} CPU(s)\n")

        def seeds():
            ds = keras.utils.image_dataset_from_directory(
                str(tmp / "folders" / "train"), image_size=(a.image_size, a.image_size), batch_size=a.batch_size,
                label_mode="categorical", shuffle=True, seed=0, verbose=False)
            # the seeds fed float pixels to a model that rescales; ours takes uint8: same pixels
            return ds.map(lambda x, y: (tf.cast(tf.round(x), tf.uint8), y)).repeat()

        feed = Feed(("train",), a.batch_size, len(classes), "multiclass", shuffle=True)
        ours = tfdata_batches(index, feed, a.image_size)

        print(f"training (input + model), img/s, best of {a.rounds} alternating rounds of {a.steps} steps:")
        # the seeds' model.fit runs Keras' own layers; ours runs them as training does
        # (train.fast_layers: models.fast_layers' fused BatchNorm; --fast off: Keras' own)
        fast = a.fast != "off"
        models = {"seeds": compiled_model(keras, a, len(classes)), "ours": compiled_model(keras, a, len(classes), fast)}
        inputs = {"seeds": seeds(), "ours": ours}
        rates: dict[str, list[float]] = {"seeds": [], "ours": []}
        for _ in range(a.rounds):
            for side in ("seeds", "ours"):
                rates[side].append(steady_fit(keras, models[side], inputs[side], a))
        base, best = max(rates["seeds"]), max(rates["ours"])
        spread = {k: "/".join(f"{v:.0f}" for v in vals) for k, vals in rates.items()}
        row("seeds: image_dataset_from_directory over exported folders", base, None, f"(rounds {spread['seeds']})")
        row(f"ours: TFRecord export + tf.data{' + fused layers' if fast else ''}", best, base,
            f"(rounds {spread['ours']}; target >= 1.5x)")

        print("\ninput alone vs the model's step rate, img/s:")
        x, y, _w = next(iter(ours))
        one = tf.data.Dataset.from_tensors((x, y)).repeat()
        plain = max(steady_fit(keras, models["seeds"], one, a) for _ in range(a.rounds))
        row("model alone, Keras' own layers (one in-memory batch, fit)", plain)
        step = plain
        if fast:
            step = max(steady_fit(keras, models["ours"], one, a) for _ in range(a.rounds))
            row("model alone, fused layers (models.fast_layers)", step, plain)
        seeds_in = timed_iter(iter(seeds()), a)
        row("seeds' input alone", seeds_in, step, "x the model's rate")
        ours_in = timed_iter(iter(ours), a)
        row("our tf.data input alone", ours_in, step, "x the model's rate")
        py_in = timed_iter(python_batches(index, feed, a.image_size, workers=os.cpu_count() or 2), a)
        row("our TensorFlow-free input alone (python_batches)", py_in, step, "x the model's rate")
        print(f"\n=> ours trains {best / base:.2f}x the seeds' way; our input runs at {ours_in / step:.1f}x the "
              f"model's step rate ({'the model is' if ours_in > step else 'the input is'} the bottleneck)")


def host_syncs(model, data, a: argparse.Namespace, fast: bool) -> tuple[float, list[str]]:
    """Host-device synchronisations per training step, and the commonest call sites
    (:func:`models.fast_layers.host_syncs`)."""
    from models.fast_layers import fast_fit
    from models.fast_layers import host_syncs as count

    def run(steps: int) -> None:
        with fast_fit() if fast else contextlib.nullcontext():
            model.fit(data, epochs=1, steps_per_epoch=steps, verbose=0)

    return count(run)


def print_syncs(per_step: float, sites: list[str]) -> None:
    where = f" (commonest: {', '.join(sites)})" if per_step >= 1 and sites else ""
    print(f"  {'':<58} {per_step:9.1f} host syncs a step{where}")


def release_device() -> None:
    gc.collect()
    try:
        import torch

        torch.cuda.empty_cache()
    except ImportError:
        pass


# ---------------------------------------------------------------------------------------
# GPU: the model alone, and the TF-free decode rate, without TensorFlow
# ---------------------------------------------------------------------------------------
def gpu_mode(a: argparse.Namespace) -> None:
    import keras
    import numpy as np
    from PIL import Image

    assert "tensorflow" not in sys.modules, "GPU mode must not import TensorFlow"
    device = "cpu"
    if a.backend == "torch":
        import torch

        torch.backends.cudnn.benchmark = True
        if torch.cuda.is_available():
            device = torch.cuda.get_device_name(0)
    else:
        import jax

        device = str(jax.devices()[0].device_kind)
    rng = np.random.default_rng(0)
    n = 4 * a.batch_size
    x = rng.integers(0, 256, (n, a.image_size, a.image_size, 3), dtype=np.uint8)
    y = np.eye(a.classes, dtype=np.float32)[rng.integers(0, a.classes, n)]

    from models.fast_layers import pinned, torch_on_cuda

    # on a GPU (torch), page-locked, as tasks.train.python_batches hands batches to fit
    xb_all, yb_all = pinned((x, y)) if torch_on_cuda() else (x, y)

    def batches():
        i = 0
        while True:
            s = (i % 4) * a.batch_size
            yield xb_all[s:s + a.batch_size], yb_all[s:s + a.batch_size]
            i += 1

    print(f"device: {device}; Keras {keras.__version__} on {keras.backend.backend()}; {a.backbone} at "
          f"{a.image_size}px, batch {a.batch_size}, {a.precision}{', jit' if a.jit else ''}, random init, every "
          f"layer training, {a.classes} outputs\n")
    # Keras' own layers, then the same model with models.fast_layers (what training runs on torch)
    sides = {"off": [False], "on": [True], "both": [False, True]}[a.fast if a.backend == "torch" else "off"]
    rates: dict[bool, float] = {}
    for fast in sides:
        model = compiled_model(keras, a, a.classes, fast)
        t = time.perf_counter()
        rates[fast] = timed_fit(model, batches(), a, fast)
        name = "model alone, fast layers + direct graph calls (fast_layers)" if fast else "model alone, Keras' own layers"
        row(name, rates[fast], rates.get(False) if fast else None,
            f"(compile + warmup + timed {time.perf_counter() - t:.0f}s)")
        if a.backend == "torch" and device != "cpu":
            print_syncs(*host_syncs(model, batches(), a, fast))
        if fast is not sides[-1]:
            del model
            release_device()
    step = rates[sides[-1]]
    if a.cuda_graphs and a.backend == "torch" and device != "cpu" and sides[-1]:
        from models.fast_layers import cuda_graph_steps

        t = time.perf_counter()
        # captured in the untimed warmup fit (its last step), replayed in the timed one
        with cuda_graph_steps(model, warmup=max(1, a.warmup - 1)) as graphed:
            graph_rate = timed_fit(model, batches(), a, True)
            per_step, sites = host_syncs(model, batches(), a, True)
        if graphed is not None:
            how = "" if graphed.replays >= a.steps else " - capture failed: eager"
            row("model alone, fast layers + the step as one CUDA graph", graph_rate, step,
                f"(capture + warmup + timed {time.perf_counter() - t:.0f}s{how})")
            print_syncs(per_step, sites)
            step = max(step, graph_rate)
    # the augmentation sub-model alone (flip, one batched affine warp, contrast) on one batch
    from models.fast_layers import fast_fit

    if a.backend != "jax":  # eager on JAX it would time op-by-op dispatch
        aug = model.get_layer("augment")
        xb = keras.ops.convert_to_tensor(x[:a.batch_size].astype(np.float32))
        with fast_fit() if sides[-1] else contextlib.nullcontext():
            for _ in range(a.warmup):
                keras.ops.convert_to_numpy(aug(xb, training=True)[:1])
            t = time.perf_counter()
            for _ in range(a.steps):
                keras.ops.convert_to_numpy(aug(xb, training=True)[:1])  # [:1]: wait for the device, copy little
        row("augmentation alone (models.augment + Keras flip/contrast)",
            a.steps * a.batch_size / (time.perf_counter() - t), step, "x the model's rate")

    # the TF-free input path's work per image: a JPEG of the export's size, PIL-decoded in threads
    from concurrent.futures import ThreadPoolExecutor

    jpegs = []
    for i in range(min(64, n)):
        buf = io.BytesIO()
        Image.fromarray(x[i]).save(buf, "JPEG", quality=90)
        jpegs.append(buf.getvalue())

    from carflow.imageio import decode_square, opencv

    decode = functools.partial(decode_square, size=a.image_size)

    workers = os.cpu_count() or 4
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(decode, jpegs))
        t = time.perf_counter()
        count = 0
        while time.perf_counter() - t < 3.0:
            count += len(list(pool.map(decode, jpegs * 4)))
        rate = count / (time.perf_counter() - t)
    how = "OpenCV" if opencv() is not None else "PIL"
    row(f"TF-free input: {how} decode of {a.image_size}px JPEGs, {workers} threads", rate, step,
        "x the model's rate")
    print(f"\n=> {step:.0f} img/s training on {device} (aim: >= 2000 img/s on one H100 for EfficientNetB1 at 240px "
          f"bf16); noise JPEGs are the worst case for decode")
    assert "tensorflow" not in sys.modules


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    os.environ.setdefault("KERAS_BACKEND", a.backend)
    if os.environ["KERAS_BACKEND"] != a.backend:
        print(f"KERAS_BACKEND={os.environ['KERAS_BACKEND']} but --backend {a.backend}: set both alike",
              file=sys.stderr)
        return 2
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if a.backend == "tensorflow":
        cpu_mode(a)
    else:
        gpu_mode(a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
