"""Train the make/model classifier on a dataset export and register it.

Pure functions first, then the thin Prefect task:

* **input** — a dataset export (:func:`tasks.export.open_export`) read either through
  tf.data (:func:`tasks.export.tfrecord_dataset`: interleaved shards, parallel decode,
  shuffle, prefetch) on the TensorFlow backend, or through the TensorFlow-free reader
  (:func:`tasks.export.iter_examples`, decodes in a thread pool, a shuffle buffer
  and a prefetch queue: :func:`python_batches`) on torch/JAX or with ``train.input=python``.
  Both yield ``(uint8 [B, S, S, 3], float32 targets [B, C], float32 sample weights [B])``
  forever; an epoch is ``ceil(n / global batch)`` steps;
* **recipe** — balanced class weights (:func:`balanced_class_weights`, scikit-learn) or
  oversampling (:func:`oversample_copies`), warmup + cosine decay, SGD/Adam/AdamW and
  label smoothing (:mod:`models.recipe`: ``lr_schedule``, ``compile_for``), the
  phases (:func:`plan_phases`: head on a frozen base, then the top layers; ``full`` for
  ``weights=none``), early stopping on the validation loss;
* **hardware** — :func:`setup_runtime`: mixed precision (bf16 where the GPU supports it),
  XLA, ``tf.distribute.MirroredStrategy`` (TensorFlow) or
  ``keras.distribution.DataParallel`` (JAX) over this machine's GPUs; batch size and
  learning rate scale with the replicas;
* **resume** — :class:`Checkpointer`: after every epoch the model with its optimizer
  state goes to ``work/train/<run key>/checkpoint-<epoch>.keras`` in storage (S3
  included), then ``state.json`` (phase, epoch, history, early-stopping state). The run
  key covers the export, the recipe and the fold, so a retried or restarted run with
  the same inputs continues after the last finished epoch;
* **cross-validation** — :func:`cv_folds`: ``StratifiedGroupKFold`` over the train + val
  rows grouped by listing;
* **registration** — :func:`register_classifier`: ``model.keras`` (float32, without the
  augmentation layers), ``labels.json``, ``config.json``, ``metrics.json``,
  ``history.json``, ``command.txt`` and the OpenVINO export (``model.xml``/``.bin``, kept
  when its top-1 agrees with Keras on ≥ 99.5% of the test split), through
  :class:`carflow.registry.Registry` (kind ``classifier``).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import queue
import shlex
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from carflow import keys
from carflow.errors import UserError
from carflow.frameworks import import_keras
from carflow.imageio import decode_square
from carflow.registry import Registry, Version
from carflow.settings import TrainSettings, as_settings
from carflow.storage import Storage, open_storage
from models.recipe import Phase, compile_for, lr_schedule, uses_jit
from tasks.shards import gpu_slot

#: bump when a change here makes an old checkpoint unusable (part of the run key)
CODE_VERSION = "1"
STATE = "state.json"
#: the export must agree with Keras on at least this share of the test split
EXPORT_AGREEMENT = 0.995
#: settings that do not change what is trained (not part of the run key)
NOT_IN_RUN_KEY = ("workers", "input", "export", "work_prefix", "dataset", "fast_layers", "cuda_graphs")

Log = Callable[[str], None]


class TrainError(UserError, RuntimeError):
    """Training cannot start as asked; the message names what is missing."""


# ---------------------------------------------------------------------------------------
# the dataset
# ---------------------------------------------------------------------------------------
def resolve_task(cfg: TrainSettings, index: Any) -> str:
    """``train.task``, or what the export declares when ``auto``."""
    declared = str(getattr(index, "task", "multiclass") or "multiclass")
    if cfg.task == "auto":
        return declared
    if cfg.task != declared:
        raise TrainError(f"train.task is {cfg.task} but dataset {index.version} is {declared}: "
                         "set train.task to auto or rebuild the dataset")
    return cfg.task


def output_names(index: Any, task: str) -> list[str]:
    """The model's outputs in order: the classes, or the multilabel label names."""
    return list(index.label_names if task == "multilabel" else index.classes)


def scan_split(index: Any, split: str) -> pd.DataFrame:
    """One row per record this dataset version trains on in ``split``: ``image_id``,
    ``listing_id``, ``label`` (class index; -1 for multilabel), ``targets`` (multilabel:
    tuple of label indices). Read without TensorFlow and without decoding images."""
    from tasks.export import iter_examples

    multilabel = index.task == "multilabel"
    names = {n: i for i, n in enumerate(index.label_names)}
    rows = []
    if split not in index.splits:
        return pd.DataFrame(columns=["image_id", "listing_id", "label", "targets"])
    for path in index.files(split):
        for ex in iter_examples(path, verify=False):
            label = index.label_of(ex)
            if multilabel:
                if ex["image_id"] in index.excluded:
                    continue
                rows.append((ex["image_id"], ex["listing_id"], -1,
                             tuple(sorted(names[a] for a in ex["attributes"] if a in names))))
            elif label is not None:
                rows.append((ex["image_id"], ex["listing_id"], int(label), ()))
    return pd.DataFrame(rows, columns=["image_id", "listing_id", "label", "targets"])


def balanced_class_weights(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """scikit-learn's ``balanced`` weights ``n / (k · count_c)`` for the classes present;
    0 for classes without a training image."""
    from sklearn.utils.class_weight import compute_class_weight

    out = np.zeros(num_classes, np.float32)
    present = np.unique(labels)
    if len(present):
        out[present] = compute_class_weight("balanced", classes=present, y=labels)
    return out


def oversample_copies(weight: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """How many copies of each example to emit so that every class is drawn about equally
    often while an epoch keeps its length on average: ``floor(w) + Bernoulli(frac(w))``
    with ``w`` the example's balanced class weight (mean 1 over the examples)."""
    w = np.asarray(weight, np.float64)
    return (np.floor(w) + (rng.random(len(w)) < (w - np.floor(w)))).astype(np.int64)


def cv_folds(rows: pd.DataFrame, k: int, seed: int = 0) -> list[np.ndarray]:
    """K folds of ``rows`` (indices of the validation rows of each fold), grouped by
    ``listing_id`` and stratified by label (``StratifiedGroupKFold``): no listing is in
    two folds."""
    from sklearn.model_selection import StratifiedGroupKFold

    if rows["listing_id"].nunique() < k:
        raise TrainError(f"--cv {k} needs at least {k} listings, the dataset has {rows['listing_id'].nunique()}")
    y = rows["label"].to_numpy()
    if (y < 0).all():  # multilabel: stratify by the label set
        y = pd.factorize(rows["targets"].map(lambda t: ",".join(map(str, t))))[0]
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    return [val for _, val in splitter.split(np.zeros(len(rows)), y, groups=rows["listing_id"].to_numpy())]


# ---------------------------------------------------------------------------------------
# input pipelines
# ---------------------------------------------------------------------------------------
@dataclass
class Feed:
    """What one pipeline needs: the records to keep (None = all), the targets' width and
    the per-class sample weights (None = 1)."""

    splits: tuple[str, ...]
    batch_size: int
    num_outputs: int
    task: str
    shuffle: bool = False
    seed: int = 0
    keep_ids: set[str] | None = None
    class_weights: np.ndarray | None = None
    oversample: bool = False
    repeat: bool = True


def _files(index: Any, splits: tuple[str, ...]) -> list[str]:
    return [f for sp in splits if sp in index.splits for f in index.files(sp)]


def _labelled(index: Any, path: str, keep_ids: set[str] | None, task: str, names: Mapping[str, int],
              num_outputs: int) -> Iterator[tuple[dict[str, Any], Any]]:
    """(record, target) of one shard file: the class index, or the multi-hot targets;
    records this dataset version (or ``keep_ids``) leaves out are skipped."""
    from tasks.export import iter_examples

    for ex in iter_examples(path, verify=False):
        if keep_ids is not None and ex["image_id"] not in keep_ids:
            continue
        if task == "multilabel":
            if ex["image_id"] in index.excluded:
                continue
            y = np.zeros(num_outputs, np.float32)
            for a in ex["attributes"]:
                if a in names:
                    y[names[a]] = 1.0
            yield ex, y
        else:
            label = index.label_of(ex)
            if label is not None:
                yield ex, int(label)


def python_batches(index: Any, feed: Feed, size: int, workers: int = 4, prefetch: int = 4,
                   finish: Callable[[tuple], tuple] | None = None) -> Iterator[tuple]:
    """The TensorFlow-free pipeline: shard files read with :func:`tasks.export.iter_examples`
    (four interleaved, in a shuffled order), a shuffle buffer, decodes
    (:func:`carflow.imageio.decode_square`) in a thread pool, and a background thread keeping ``prefetch`` batches ready (each passed through
    ``finish`` there, e.g. :func:`models.fast_layers.pinned`). Every pass over the records
    ends with its partial batch."""
    files = _files(index, feed.splits)
    multilabel = feed.task == "multilabel"
    names = {n: i for i, n in enumerate(index.label_names)}
    rng = np.random.default_rng(feed.seed)
    buffer_size = max(256, 8 * feed.batch_size) if feed.shuffle else 1
    end_of_pass = object()

    def items(path: str) -> Iterator[tuple[bytes, Any, float]]:
        for ex, y in _labelled(index, path, feed.keep_ids, feed.task, names, feed.num_outputs):
            w = 1.0
            copies = 1
            if not multilabel and feed.class_weights is not None:
                if feed.oversample:
                    copies = int(oversample_copies(np.array([feed.class_weights[y]]), rng)[0])
                else:
                    w = float(feed.class_weights[y])
            for _ in range(copies):
                yield ex["image"], y, w

    def records() -> Iterator[Any]:
        while True:
            order = rng.permutation(len(files)) if feed.shuffle else np.arange(len(files))
            streams = [items(files[i]) for i in order]
            active, pending = streams[:4], streams[4:]
            buf: list = []
            while active:
                for it in list(active):
                    item = next(it, None)
                    if item is None:
                        active.remove(it)
                        if pending:
                            active.append(pending.pop(0))
                    elif feed.shuffle:
                        buf.append(item)
                        if len(buf) >= buffer_size:
                            yield buf.pop(int(rng.integers(len(buf))))
                    else:
                        yield item
            rng.shuffle(buf)
            yield from buf
            yield end_of_pass
            if not feed.repeat:
                return

    def assemble(pool: ThreadPoolExecutor, chunk: list) -> tuple:
        x = np.stack(list(pool.map(lambda it: decode_square(it[0], size), chunk)))
        if multilabel:
            y = np.stack([it[1] for it in chunk]).astype(np.float32)
        else:
            y = np.zeros((len(chunk), feed.num_outputs), np.float32)
            y[np.arange(len(chunk)), [it[1] for it in chunk]] = 1.0
        return x, y, np.asarray([it[2] for it in chunk], np.float32)

    def batches(pool: ThreadPoolExecutor) -> Iterator[tuple]:
        chunk: list = []
        for item in records():
            if item is end_of_pass or len(chunk) == feed.batch_size:
                if chunk:
                    yield assemble(pool, chunk)
                chunk = []
            if item is not end_of_pass:
                chunk.append(item)

    q: queue.Queue = queue.Queue(maxsize=prefetch)
    stop = threading.Event()
    done = object()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.5)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            with ThreadPoolExecutor(workers) as pool:
                for b in batches(pool):
                    if not put(finish(b) if finish is not None else b):
                        return
        except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer
            put(exc)
            return
        put(done)

    thread = threading.Thread(target=produce, name="carflow-train-input", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


def tfdata_batches(index: Any, feed: Feed, size: int) -> Any:
    """The tf.data pipeline over :func:`tasks.export.tfrecord_dataset` (interleaved
    shards, parallel decode, shuffle, prefetch), with targets, weights, the fold's
    records and oversampling added."""
    from carflow.frameworks import import_tensorflow
    from tasks.export import tfrecord_dataset

    tf = import_tensorflow()
    auto = tf.data.AUTOTUNE
    per_record = feed.keep_ids is not None or feed.oversample
    ds = None
    for split in (sp for sp in feed.splits if sp in index.splits):
        part = tfrecord_dataset(index, split, size, batch_size=feed.batch_size, shuffle=feed.shuffle,
                                seed=feed.seed, with_ids=True)
        ds = part if ds is None else ds.concatenate(part)
    weights = tf.constant(feed.class_weights if feed.class_weights is not None else np.ones(max(1, feed.num_outputs)),
                          tf.float32)
    multilabel = feed.task == "multilabel"
    if per_record:
        ds = ds.unbatch()
        if feed.keep_ids is not None:
            ids = sorted(feed.keep_ids) or ["\x00"]
            table = tf.lookup.StaticHashTable(
                tf.lookup.KeyValueTensorInitializer(tf.constant(ids), tf.ones(len(ids), tf.int64)), 0)
            ds = ds.filter(lambda x, y, i: table.lookup(i) > 0)
            if feed.shuffle:
                ds = ds.shuffle(max(256, 8 * feed.batch_size), seed=feed.seed)
        if feed.oversample and not multilabel and feed.class_weights is not None:
            def copies(x, y, i):
                w = tf.gather(weights, y)
                n = tf.cast(tf.floor(w), tf.int64) + tf.cast(
                    tf.random.uniform([], seed=feed.seed) < w - tf.floor(w), tf.int64)
                return tf.data.Dataset.from_tensors((x, y, i)).repeat(n)

            ds = ds.flat_map(copies).shuffle(max(256, 8 * feed.batch_size), seed=feed.seed)
            weights = tf.ones_like(weights)
        ds = ds.batch(feed.batch_size)

    def targets(x, y, i):
        if multilabel:
            return x, tf.cast(y, tf.float32), tf.ones(tf.shape(y)[:1], tf.float32)
        return x, tf.one_hot(y, feed.num_outputs, dtype=tf.float32), tf.gather(weights, y)

    ds = ds.map(targets, num_parallel_calls=auto)
    if feed.repeat:
        ds = ds.repeat()
    return ds.prefetch(auto)


def pick_input(cfg: TrainSettings, task: str) -> str:
    """``tfdata`` on the TensorFlow backend (``train.input=auto``), else ``python``."""
    if cfg.input != "auto":
        return cfg.input
    keras = import_keras()
    return "tfdata" if keras.backend.backend() == "tensorflow" else "python"


def make_input(kind: str, index: Any, feed: Feed, size: int, workers: int) -> Any:
    """The batches ``fit`` reads; on a CUDA device (torch) the Python pipeline hands them
    over page-locked, for an upload that does not wait (:mod:`models.fast_layers`)."""
    if kind == "tfdata":
        return tfdata_batches(index, feed, size)
    from models.fast_layers import pinned, torch_on_cuda

    return python_batches(index, feed, size, workers, finish=pinned if torch_on_cuda() else None)


# ---------------------------------------------------------------------------------------
# recipe
# ---------------------------------------------------------------------------------------
def plan_phases(cfg: TrainSettings, replicas: int = 1) -> list[Phase]:
    """Phase 1 (``head``, frozen base) for ``head_epochs``, phase 2 (``finetune``) for the
    rest of ``epochs`` at ``finetune_lr_factor`` × the rate; ``weights=none``: one
    ``full`` phase. The rate scales linearly with the replicas (the global batch does)."""
    from models.classifier import is_pretrained

    lr = cfg.learning_rate * replicas
    if not is_pretrained(cfg):
        return [Phase("full", 0, cfg.epochs, lr)]
    head = min(cfg.head_epochs, cfg.epochs)
    phases = []
    if head:
        phases.append(Phase("head", 0, head, lr))
    if cfg.epochs > head:
        phases.append(Phase("finetune", head, cfg.epochs, lr * cfg.finetune_lr_factor))
    return phases


# ---------------------------------------------------------------------------------------
# hardware
# ---------------------------------------------------------------------------------------
@dataclass
class Runtime:
    backend: str
    device: str
    precision: str  # fp32 | bf16 | fp16
    replicas: int
    distribution: str  # none | mirrored | data_parallel
    strategy: Any = None

    def scope(self) -> Any:
        return self.strategy.scope() if self.strategy is not None else contextlib.nullcontext()

    def describe(self) -> dict[str, Any]:
        return {"backend": self.backend, "device": self.device, "precision": self.precision,
                "replicas": self.replicas, "distribution": self.distribution}


def _gpus(backend: str) -> tuple[list[Any], str, bool]:
    """(GPU handles, device name, bf16 supported) for the backend, asked of its framework."""
    if backend == "torch":
        import torch

        n = torch.cuda.device_count()
        if not n:
            return [], "cpu", False
        return list(range(n)), torch.cuda.get_device_name(0), torch.cuda.is_bf16_supported()
    if backend == "jax":
        import jax

        gpus = [d for d in jax.devices() if d.platform == "gpu"]
        return gpus, (gpus[0].device_kind if gpus else "cpu"), bool(gpus)
    from carflow.frameworks import import_tensorflow

    tf = import_tensorflow()
    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return [], "cpu", False
    details = tf.config.experimental.get_device_details(gpus[0])
    cc = details.get("compute_capability") or (0, 0)
    return gpus, str(details.get("device_name", "gpu")), tuple(cc) >= (8, 0)


#: what ``train.cpu_recipe`` trains on a machine without a GPU with ``weights=none``
CPU_RECIPE = {"backbone": "mobilenetv2", "alpha": 0.35, "image_size": 96}
#: and how long, where those settings are at their defaults: from random weights on the
#: demo marketplace the validation loss rises for ~10 epochs before it falls (10 epochs with
#: patience 3 stopped at epoch 4 with test top-1 0.0 or 0.27; 40 epochs reached 0.53)
CPU_SCHEDULE = {"epochs": 40, "early_stopping_start": 15}


def apply_cpu_recipe(cfg: TrainSettings, has_gpu: bool) -> tuple[TrainSettings, str]:
    """``cfg`` with :data:`CPU_RECIPE` laid over it when ``train.cpu_recipe`` is on, there is
    no GPU, nothing is transferred (``weights=none``) and the backbone, width and image
    size are the defaults (a user who set one gets it); with the line that says so."""
    from models.classifier import is_pretrained

    defaults = {k: TrainSettings.model_fields[k].default for k in CPU_RECIPE}
    if not cfg.cpu_recipe or has_gpu or is_pretrained(cfg) or any(getattr(cfg, k) != v for k, v in defaults.items()):
        return cfg, ""
    schedule = {k: v for k, v in CPU_SCHEDULE.items() if getattr(cfg, k) == TrainSettings.model_fields[k].default}
    longer = (f", {schedule['epochs']} epochs" if "epochs" in schedule else "") + (
        f", early stopping from epoch {schedule['early_stopping_start'] + 1}" if "early_stopping_start" in schedule else "")
    return cfg.model_copy(update={**CPU_RECIPE, **schedule}), (
        f"no GPU and weights=none: training the CPU recipe, {CPU_RECIPE['backbone']} alpha {CPU_RECIPE['alpha']} at "
        f"{CPU_RECIPE['image_size']}px{longer}, in place of {defaults['backbone']} at {defaults['image_size']}px from "
        "scratch (--no-cpu-recipe: the settings as given)")


def setup_runtime(cfg: TrainSettings) -> Runtime:
    """Precision and distribution for this process (sets Keras' global dtype policy and,
    on JAX, its distribution). ``precision=auto``: bf16 on a GPU that supports it, fp16
    on an older GPU, fp32 on a CPU."""
    keras = import_keras()
    backend = keras.backend.backend()
    gpus, device, bf16_ok = _gpus(backend)
    precision = cfg.precision
    if precision == "auto":
        precision = ("bf16" if bf16_ok else "fp16") if gpus else "fp32"
    keras.config.set_dtype_policy({"fp32": "float32", "bf16": "mixed_bfloat16", "fp16": "mixed_float16"}[precision])
    mode = cfg.distribution
    if mode == "auto":
        mode = ("mirrored" if backend == "tensorflow" else "data_parallel") if len(gpus) > 1 else "none"
    if mode == "none":
        return Runtime(backend, device, precision, 1, "none")
    if mode == "mirrored":
        if backend != "tensorflow":
            raise TrainError(f"train.distribution=mirrored needs KERAS_BACKEND=tensorflow (this is {backend}); "
                             "on JAX use data_parallel; on torch train on one GPU (see the README)")
        from carflow.frameworks import import_tensorflow

        strategy = import_tensorflow().distribute.MirroredStrategy()
        return Runtime(backend, device, precision, int(strategy.num_replicas_in_sync), "mirrored", strategy)
    if backend != "jax":
        raise TrainError(f"train.distribution=data_parallel needs KERAS_BACKEND=jax (this is {backend}); "
                         "on TensorFlow use mirrored")
    devices = keras.distribution.list_devices("gpu")
    keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
    return Runtime(backend, device, precision, len(devices), "data_parallel")


# ---------------------------------------------------------------------------------------
# callbacks: the epoch line, checkpoints + early stopping, TensorBoard scalars
# ---------------------------------------------------------------------------------------
def _duration(s: float) -> str:
    s = int(round(s))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def epoch_line(epoch: int, total: int, phase: str, logs: Mapping[str, float], seconds: float, images: int,
               eta: float, fold: str = "") -> str:
    """``epoch 3/10 [finetune] loss 0.912 acc 0.701 val_loss 1.003 val_acc 0.655 | 41s 312 img/s | ETA 4m47s``"""
    shown = " ".join(f"{k} {float(v):.4f}" for k, v in logs.items()
                     if k in ("loss", "acc", "val_loss", "val_acc") and v is not None)
    rate = images / seconds if seconds > 0 else 0.0
    return (f"{fold}epoch {epoch}/{total} [{phase}] {shown} | {_duration(seconds)} {rate:.{0 if rate >= 10 else 1}f} img/s"
            f" | ETA {_duration(eta)}")


def _callback_base() -> type:
    return import_keras().callbacks.Callback


class Checkpointer:
    """Resumable state of one training run in storage, under ``work/train/<run key>/``:
    ``checkpoint-<epoch>.keras`` (model + optimizer), then ``state.json`` naming it
    (phase, next epoch, history, early-stopping state). The older checkpoint is deleted
    after the new state is written, so a crash at any point leaves a consistent pair."""

    def __init__(self, store: Storage, run_key: str, prefix: str = keys.TRAIN_PREFIX):
        self.store = store
        self.run_key = run_key
        self.prefix = prefix

    def key(self, name: str = "") -> str:
        return keys.train_run_key(self.run_key, name, self.prefix)

    def uri(self, name: str = "") -> str:
        return self.store.uri(self.key(name))

    def state(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.store.get(self.key(STATE)))
        except KeyError:
            return None

    def save(self, model: Any, state: dict[str, Any]) -> None:
        name = f"checkpoint-{state['epoch']:04d}.keras"
        with tempfile.TemporaryDirectory(prefix="carflow-ckpt-") as tmp:
            path = Path(tmp) / name
            model.save(path)
            self.store.put(self.key(name), path.read_bytes(), content_type="application/octet-stream")
        old = self.state()
        self.store.put(self.key(STATE), json.dumps({**state, "checkpoint": name}, indent=1).encode(),
                       content_type="application/json")
        if old and old.get("checkpoint") and old["checkpoint"] != name:
            self.store.delete(self.key(old["checkpoint"]))

    def load_model(self, state: Mapping[str, Any]) -> Any:
        with tempfile.TemporaryDirectory(prefix="carflow-ckpt-") as tmp:
            path = Path(tmp) / state["checkpoint"]
            path.write_bytes(self.store.get(self.key(state["checkpoint"])))
            from models.classifier import load_keras_model

            return load_keras_model(path, compile=True)

    def clear(self) -> None:
        """Remove the checkpoints and state (the TensorBoard logs stay)."""
        for k in self.store.list(self.key() + "/"):
            if not k.startswith(self.key("tensorboard")):
                self.store.delete(k)


class TensorBoardScalars:
    """Epoch scalars as TensorBoard event files (the ``tensorboard`` package's writer, no
    TensorFlow needed), uploaded to storage after every epoch."""

    def __init__(self, store: Storage, key_prefix: str, local_dir: str):
        self.store, self.key_prefix, self.dir = store, key_prefix.rstrip("/"), Path(local_dir)
        self.writer = None
        try:
            from tensorboard.summary.writer.event_file_writer import EventFileWriter

            self.dir.mkdir(parents=True, exist_ok=True)
            self.writer = EventFileWriter(str(self.dir))
        except ImportError:  # tensorboard not installed: no logs, training goes on
            self.writer = None

    def write(self, step: int, logs: Mapping[str, float]) -> None:
        if self.writer is None:
            return
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary

        values = [Summary.Value(tag=k, simple_value=float(v)) for k, v in logs.items()
                  if isinstance(v, (int, float, np.floating))]
        self.writer.add_event(Event(wall_time=time.time(), step=step, summary=Summary(value=values)))
        self.writer.flush()
        for path in self.dir.rglob("*"):
            if path.is_file():
                self.store.put(f"{self.key_prefix}/{path.relative_to(self.dir).as_posix()}", path.read_bytes())

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def make_epoch_callback(ckpt: Checkpointer, state: dict[str, Any], phase: Phase, cfg: TrainSettings,
                        images_per_epoch: int, log: Log, tb: TensorBoardScalars | None,
                        progress: Callable[[float, str], None] | None, fold: str = "") -> Any:
    """One Keras callback: the epoch line with ETA, TensorBoard scalars, early stopping on
    the validation loss (patience ``train.early_stopping``; its state is checkpointed),
    the checkpoint, and the progress hook."""
    base = _callback_base()

    class EpochEnd(base):  # type: ignore[misc, valid-type]
        def on_epoch_begin(self, epoch, logs=None):
            self.t0 = time.monotonic()

        def on_epoch_end(self, epoch, logs=None):
            logs = {k: float(v) for k, v in (logs or {}).items()}
            seconds = time.monotonic() - self.t0
            done = epoch + 1
            state["seconds"] = state.get("seconds", 0.0) + seconds
            state["epochs_run"] = state.get("epochs_run", 0) + 1
            remaining = cfg.epochs - done
            eta = remaining * state["seconds"] / max(1, state["epochs_run"])
            state["history"].append({"epoch": done, "phase": phase.name, **logs, "seconds": round(seconds, 3)})
            log(epoch_line(done, cfg.epochs, phase.name, logs, seconds, images_per_epoch, eta, fold))
            if tb is not None:
                tb.write(done, {**logs, "seconds": seconds})
            val = logs.get("val_loss") if done > cfg.early_stopping_start else None
            es = state.setdefault("early_stopping", {})
            key = phase.name
            best = es.get(key, {}).get("best")
            if val is not None and (best is None or val < best - 1e-6):
                es[key] = {"best": val, "wait": 0}
            elif val is not None:
                es[key] = {"best": best, "wait": es.get(key, {}).get("wait", 0) + 1}
                if cfg.early_stopping and es[key]["wait"] >= cfg.early_stopping:
                    self.model.stop_training = True
                    state["stopped"] = {**state.get("stopped", {}), key: done}
                    log(f"{fold}early stopping [{phase.name}] after epoch {done}: val_loss has not improved for "
                        f"{es[key]['wait']} epoch(s)")
            state["epoch"] = phase.end if self.model.stop_training else done
            state["phase"] = phase.name
            ckpt.save(self.model, state)
            if progress is not None:
                progress(done / cfg.epochs, log_line_short(done, cfg.epochs, phase.name, logs))

    return EpochEnd()


def log_line_short(epoch: int, total: int, phase: str, logs: Mapping[str, float]) -> str:
    acc = logs.get("val_acc", logs.get("acc"))
    return f"epoch {epoch}/{total} [{phase}]" + (f" val_acc {acc:.3f}" if acc is not None else "")


# ---------------------------------------------------------------------------------------
# one training run (one fold)
# ---------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    model: Any  # the trained Keras model (with augmentation, training dtype policy)
    history: list[dict[str, Any]]
    run_key: str
    resumed_from: int | None
    runtime: dict[str, Any]
    input: str
    counts: dict[str, int]
    tensorboard: str
    extra: dict[str, Any] = field(default_factory=dict)


def run_key(index: Any, cfg: TrainSettings, task: str, fold: str = "") -> str:
    """What a training run's result depends on: the export's content, the recipe, the task
    and the fold (not the worker count, the input pipeline or where things go)."""
    recipe = {k: v for k, v in cfg.model_dump(mode="json").items() if k not in NOT_IN_RUN_KEY}
    doc = {"code": CODE_VERSION, "export": index.doc.get("content_key"), "dataset": index.version,
           "recipe": recipe, "task": task, "fold": fold, "backend": import_keras().backend.backend()}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def train_one(
    store: Storage,
    index: Any,
    cfg: TrainSettings,
    task: str,
    train_rows: pd.DataFrame,
    train_splits: tuple[str, ...] = ("train",),
    val_splits: tuple[str, ...] = ("val",),
    keep_train: set[str] | None = None,
    keep_val: set[str] | None = None,
    n_val: int | None = None,
    fold: str = "",
    log: Log = print,
    progress: Callable[[float, str], None] | None = None,
) -> TrainResult:
    """Train (or resume) one model on ``train_rows`` (from :func:`scan_split`; the records
    of ``train_splits``, restricted to ``keep_train``), validated on ``val_splits``
    (restricted to ``keep_val``, ``n_val`` records)."""
    from models.augment import use_xla
    from models.classifier import build_classifier, set_phase
    from models.fast_layers import accelerate, cuda_graph_steps, fast_fit

    runtime = setup_runtime(cfg)
    names = output_names(index, task)
    num_outputs = len(names)
    global_batch = cfg.batch_size * runtime.replicas
    n_train = len(train_rows)
    if n_train == 0:
        raise TrainError(f"dataset {index.version} has no training images: run `carflow dataset --tfrecord`")
    steps = max(1, math.ceil(n_train / global_batch))
    if n_val is None:
        n_val = sum(index.count(sp) for sp in val_splits if sp in index.splits)
    val_steps = math.ceil(n_val / global_batch) if n_val else 0
    weights = None
    if task == "multiclass" and cfg.balance != "none":
        weights = balanced_class_weights(train_rows["label"].to_numpy(), num_outputs)
    kind = pick_input(cfg, task)
    train_feed = Feed(tuple(train_splits), global_batch, num_outputs, task, shuffle=True, seed=cfg.seed,
                      keep_ids=keep_train, class_weights=weights, oversample=cfg.balance == "oversample")
    val_feed = Feed(tuple(val_splits), global_batch, num_outputs, task, keep_ids=keep_val)
    train_data = make_input(kind, index, train_feed, cfg.image_size, cfg.workers)
    val_data = make_input(kind, index, val_feed, cfg.image_size, cfg.workers) if val_steps else None

    key = run_key(index, cfg, task, fold)
    ckpt = Checkpointer(store, key, cfg.work_prefix)
    state = ckpt.state()
    resumed_from = None
    phases = plan_phases(cfg, runtime.replicas)
    with runtime.scope():
        if state is not None:
            resumed_from = int(state["epoch"])
            model = ckpt.load_model(state)
            log(f"{fold}resuming at epoch {resumed_from + 1}/{cfg.epochs} after [{state['phase']}] from "
                f"{ckpt.uri(state['checkpoint'])}")
        else:
            state = {"epoch": 0, "phase": phases[0].name, "history": [], "run_key": key}
            model = build_classifier(num_outputs, cfg, task)
        if cfg.fast_layers:
            accelerate(model)
        use_xla(model, uses_jit(cfg))  # built or loaded: the switch is not saved with the model
    tb = TensorBoardScalars(store, ckpt.key("tensorboard"), tempfile.mkdtemp(prefix="carflow-tb-"))
    images_per_epoch = steps * global_batch
    try:
        for phase in phases:
            if state["epoch"] >= phase.end:
                continue
            start = max(phase.start, int(state["epoch"]))
            continuing = resumed_from is not None and state["phase"] == phase.name and start > phase.start
            if not continuing:  # a new phase: set what trains, recompile (a new optimizer)
                with runtime.scope():
                    trainable = set_phase(model, phase.name, cfg.finetune_layers)
                    compile_for(model, cfg, task, lr_schedule(cfg, phase, steps))
                log(f"{fold}phase {phase.name}: epochs {phase.start + 1}-{phase.end}, lr {phase.learning_rate:g}, "
                    f"{trainable} base layers trainable, {n_train} images, {steps} steps of {global_batch}")
            callback = make_epoch_callback(ckpt, state, phase, cfg, images_per_epoch, log, tb, progress, fold)
            with fast_fit() if cfg.fast_layers else contextlib.nullcontext(), \
                    cuda_graph_steps(model, cfg.cuda_graphs, log=lambda line: log(f"{fold}{line}")) as graphed:
                if graphed is not None:
                    log(f"{fold}the training step runs as one CUDA graph after {graphed.warmup} eager steps "
                        f"(train.cuda_graphs)")
                elif cfg.cuda_graphs:
                    log(f"{fold}train.cuda_graphs needs KERAS_BACKEND=torch on a CUDA GPU, not fp16: training "
                        f"without it (drop --cuda-graphs to silence this)")
                model.fit(
                    train_data, epochs=phase.end, initial_epoch=start, steps_per_epoch=steps,
                    validation_data=val_data, validation_steps=val_steps or None,
                    callbacks=[callback], verbose=0, shuffle=False,  # the pipelines shuffle
                )
    finally:
        tb.close()
    counts = {"train": n_train, "val": n_val}
    return TrainResult(model, list(state["history"]), key, resumed_from, runtime.describe(), kind, counts,
                       ckpt.uri("tensorboard"), {"checkpointer": ckpt})


# ---------------------------------------------------------------------------------------
# registration
# ---------------------------------------------------------------------------------------
def predict_logits(model: Any, index: Any, splits: tuple[str, ...] | str, size: int, batch: int = 64,
                   keep_ids: set[str] | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Logits of a Keras model (or any callable on uint8 batches) over ``splits``
    (restricted to ``keep_ids``), with the targets (class index, or multi-hot) and the
    image ids; read without TensorFlow."""
    splits = (splits,) if isinstance(splits, str) else tuple(splits)
    is_keras = hasattr(model, "predict_on_batch")
    names = {n: i for i, n in enumerate(index.label_names)}
    width = len(index.label_names) if index.task == "multilabel" else len(index.classes)
    xs: list[np.ndarray] = []
    ys: list[Any] = []
    ids: list[str] = []
    outs: list[np.ndarray] = []

    def flush() -> None:
        if xs:
            x = np.stack(xs)
            out = model.predict_on_batch(x) if is_keras else model(x)  # no autograd graph on torch
            outs.append(np.asarray(out, np.float32))
            xs.clear()

    for path in _files(index, splits):
        for ex, y in _labelled(index, path, keep_ids, index.task, names, width):
            xs.append(decode_square(ex["image"], size))
            ys.append(y)
            ids.append(ex["image_id"])
            if len(xs) == batch:
                flush()
    flush()
    logits = np.concatenate(outs) if outs else np.zeros((0, width), np.float32)
    return logits, np.asarray(ys), ids


def quick_metrics(logits: np.ndarray, y: np.ndarray, task: str, names: list[str]) -> dict[str, Any]:
    """Top-1/top-5 (multiclass) or binary accuracy with per-label precision and recall
    (multilabel) on one split; the full evaluation is ``tasks/evaluate.py``'s."""
    n = int(len(logits))
    if n == 0:
        return {"n": 0}
    if task == "multilabel":
        pred = logits > 0
        truth = y.astype(bool)
        tp = (pred & truth).sum(0)
        per = {name: {"precision": float(tp[i] / max(1, pred[:, i].sum())),
                      "recall": float(tp[i] / max(1, truth[:, i].sum()))} for i, name in enumerate(names)}
        return {"n": n, "binary_accuracy": float((pred == truth).mean()), "per_label": per}
    top = np.argsort(-logits, axis=1)
    return {"n": n, "top1": float((top[:, 0] == y).mean()),
            "top5": float((top[:, :5] == y[:, None]).any(axis=1).mean())}


def export_agreement(reference: np.ndarray, exported: np.ndarray, task: str) -> float:
    """Share of images whose top-1 (multiclass) or thresholded labels (multilabel) agree."""
    if len(reference) == 0:
        return 1.0
    if task == "multilabel":
        return float(((reference > 0) == (exported > 0)).all(axis=1).mean())
    return float((reference.argmax(1) == exported.argmax(1)).mean())


def register_classifier(
    store: Storage,
    index: Any,
    cfg: TrainSettings,
    task: str,
    result: TrainResult,
    argv: list[str] | None = None,
    extra_metrics: Mapping[str, Any] | None = None,
    log: Log = print,
    extra_files: Mapping[str, bytes] | None = None,
) -> Version:
    """Store a classifier version: the float32 inference model, labels, config, metrics
    (test split, export agreement), history, the command line, the OpenVINO export and
    ``extra_files`` (a CV run's out-of-fold logits, :func:`oof_bytes`)."""
    from models.classifier import (
        CONFIG_FILE,
        LABELS_FILE,
        MODEL_FILE,
        float32_copy,
        inference_model,
    )

    names = output_names(index, task)
    trained = result.model
    if result.runtime.get("precision", "fp32") != "fp32":
        trained = float32_copy(trained, len(names), cfg, task)
    model = inference_model(trained)
    command = shlex.join(argv if argv is not None else [os.path.basename(sys.executable), *sys.argv])
    logits, y, _ids = predict_logits(model, index, "test", cfg.image_size)
    test = quick_metrics(logits, y, task, names)
    metrics: dict[str, Any] = {"test": test, **dict(extra_metrics or {})}
    config = {
        **cfg.model_dump(mode="json"), "task": task, "labels": len(names), "temperature": 1.0,
        "dataset_version": index.version, "classes_version": index.doc.get("classes_version"),
        "input_pipeline": result.input, "runtime": result.runtime, "keras_backend": result.runtime.get("backend"),
        "keras_version": import_keras().__version__,
    }
    with tempfile.TemporaryDirectory(prefix="carflow-register-") as tmp:
        files: dict[str, Any] = {}
        model.save(Path(tmp) / MODEL_FILE)
        files[MODEL_FILE] = str(Path(tmp) / MODEL_FILE)
        if cfg.export == "openvino":
            try:
                from models.openvino import BIN, XML, OpenVinoModel, export

                export(model, Path(tmp) / "openvino")
                ov_logits, _, _ = predict_logits(OpenVinoModel(Path(tmp) / "openvino" / XML), index, "test",
                                                 cfg.image_size)
                agree = export_agreement(logits, ov_logits, task)
                metrics["export"] = {"format": "openvino", "test_top1_agreement": agree, "n": int(len(logits)),
                                     "max_abs_logit_diff": float(np.abs(logits - ov_logits).max()) if len(logits) else 0.0,
                                     "kept": agree >= EXPORT_AGREEMENT}
                if agree >= EXPORT_AGREEMENT:
                    files[XML] = str(Path(tmp) / "openvino" / XML)
                    files[BIN] = str(Path(tmp) / "openvino" / BIN)
                else:
                    log(f"OpenVINO export agrees with Keras on {agree:.2%} of the test split (< "
                        f"{EXPORT_AGREEMENT:.1%}): not registered, serving uses model.keras")
            except Exception as exc:  # noqa: BLE001 - the Keras model is still registered
                metrics["export"] = {"format": "openvino", "error": f"{exc.__class__.__name__}: {exc}"[:500],
                                     "kept": False}
                log(f"OpenVINO export failed ({exc.__class__.__name__}: {exc}); serving uses model.keras")
        config["inference_export"] = "openvino" if "model.xml" in files else None
        history = {"epochs": len(result.history), "history": result.history, "resumed_from_epoch": result.resumed_from,
                   "run_key": result.run_key, "tensorboard": result.tensorboard}
        files[LABELS_FILE] = json.dumps(names, indent=1)
        files[CONFIG_FILE] = json.dumps(config, indent=2, default=str)
        files["metrics.json"] = json.dumps(metrics, indent=2, default=str)
        files["history.json"] = json.dumps(history, indent=1, default=str)
        files["command.txt"] = command + "\n"
        files.update(extra_files or {})
        meta = {"task": task, "dataset_version": index.version, "classes_version": index.doc.get("classes_version"),
                "command": command, "backbone": cfg.backbone, "image_size": cfg.image_size, "temperature": 1.0,
                "training": {"test": {k: v for k, v in test.items() if k != "per_label"},
                             "export": metrics.get("export"), "epochs": len(result.history),
                             "runtime": result.runtime, "tensorboard": result.tensorboard}}
        return Registry(store).put_version("classifier", files, meta=meta)


# ---------------------------------------------------------------------------------------
# the whole job: train (or K folds) → register
# ---------------------------------------------------------------------------------------
def train_classifier(
    storage: Storage | str | None,
    cfg: TrainSettings | Mapping[str, Any] | None = None,
    argv: list[str] | None = None,
    log: Log = print,
    progress: Callable[[float, str], None] | None = None,
) -> dict[str, Any]:
    """Train on ``cfg.dataset``'s export (``latest`` by default) and register a classifier
    version; with ``cfg.cv ≥ 2`` run K folds grouped by listing first, report each fold,
    the mean and the best, and register the best fold's model. Returns a summary with
    the version and its URIs."""
    from tasks.export import open_export

    cfg = as_settings(TrainSettings, cfg)
    keras = import_keras()
    cfg, note = apply_cpu_recipe(cfg, bool(_gpus(keras.backend.backend())[0]))
    if note:
        log(note)
    keras.utils.set_random_seed(cfg.seed)  # the same weights init and shuffles for the same seed
    store = open_storage(storage)
    index = open_export(store, cfg.dataset)
    task = resolve_task(cfg, index)
    names = output_names(index, task)
    if not names:
        raise TrainError(f"dataset {index.version} has no {'label names' if task == 'multilabel' else 'classes'}: "
                         "rebuild it with `carflow dataset --tfrecord` and a lower --min-images (classes.min_images) "
                         "if every class was too rare")
    t0 = time.monotonic()
    train_rows = scan_split(index, "train")
    log(f"dataset {index.version}: {task}, {len(names)} outputs, {len(train_rows)} train / "
        f"{index.count('val') if 'val' in index.splits else 0} val / "
        f"{index.count('test') if 'test' in index.splits else 0} test images at {index.size}px; "
        f"{cfg.backbone} {cfg.image_size}px weights={cfg.weights}")
    extra: dict[str, Any] = {}
    files: dict[str, bytes] = {}
    if cfg.cv >= 2:
        from models.classifier import OOF_FILE

        results, extra["cv"], files[OOF_FILE] = cross_validate(store, index, cfg, task, train_rows, log, progress)
        result = results[extra["cv"]["best_fold"] - 1]
    else:
        result = train_one(store, index, cfg, task, train_rows, log=log, progress=progress)
    extra["training_seconds"] = round(time.monotonic() - t0, 1)
    version = register_classifier(store, index, cfg, task, result, argv, extra, log, files)
    for r in results if cfg.cv >= 2 else [result]:
        r.extra["checkpointer"].clear()
    metrics = json.loads(version.get("metrics.json"))
    return {
        "version": version.version,
        "model": version.uri("model.keras"),
        "folder": version.uri(),
        "task": task,
        "dataset_version": index.version,
        "epochs": len(result.history),
        "resumed_from_epoch": result.resumed_from,
        "history": result.history,
        "test": metrics.get("test"),
        "export": metrics.get("export"),
        "cv": extra.get("cv"),
        "runtime": result.runtime,
        "input": result.input,
        "tensorboard": result.tensorboard,
        "seconds": extra["training_seconds"],
    }


def oof_bytes(image_ids: list[str], splits: list[str], folds: list[int], logits: np.ndarray) -> bytes:
    """The out-of-fold logits of a CV run as one ``.npz`` (``models.classifier.OOF_FILE``):
    every train and val row once, with its split and the fold that held it out."""
    buf = io.BytesIO()
    np.savez_compressed(buf, image_ids=np.asarray(image_ids, dtype=str), splits=np.asarray(splits, dtype=str),
                        folds=np.asarray(folds, np.int32), logits=np.asarray(logits, np.float32))
    return buf.getvalue()


def cross_validate(store: Storage, index: Any, cfg: TrainSettings, task: str, train_rows: pd.DataFrame, log: Log,
                   progress: Callable[[float, str], None] | None = None
                   ) -> tuple[list[TrainResult], dict[str, Any], bytes]:
    """K-fold cross-validation over the export's train + val records, grouped by listing
    (:func:`cv_folds`); each fold trains (resumably) on K-1 folds and is scored on the
    held-out one. Returns the folds' results, the report (each fold, mean ± std, the best
    fold) and the out-of-fold logits of every train + val row (:func:`oof_bytes`):
    out-of-sample probabilities for the evaluation's label-issue finders."""
    names = output_names(index, task)
    val_rows = scan_split(index, "val")
    rows = pd.concat([train_rows, val_rows], ignore_index=True)
    split_of = dict(zip(rows["image_id"], ["train"] * len(train_rows) + ["val"] * len(val_rows)))
    folds = cv_folds(rows, cfg.cv, cfg.seed)
    splits = ("train", "val")
    results, per_fold = [], []
    oof_ids: list[str] = []
    oof_folds: list[int] = []
    oof_logits: list[np.ndarray] = []
    for k, val_idx in enumerate(folds):
        held = set(rows["image_id"].iloc[val_idx])
        fold_rows = rows[~rows["image_id"].isin(held)]
        tag = f"fold {k + 1}/{cfg.cv} "
        res = train_one(store, index, cfg, task, fold_rows, splits, splits, keep_train=set(fold_rows["image_id"]),
                        keep_val=held, n_val=len(held), fold=tag, log=log, progress=progress)
        from models.classifier import inference_model

        logits, y, ids = predict_logits(inference_model(res.model), index, splits, cfg.image_size, keep_ids=held)
        oof_ids += ids
        oof_folds += [k + 1] * len(ids)
        oof_logits.append(logits)
        m = quick_metrics(logits, y, task, names)
        per_fold.append({"fold": k + 1, "n_train": len(fold_rows), "n_val": len(held),
                         **{k2: v for k2, v in m.items() if k2 != "per_label"}})
        results.append(res)
        log(f"{tag}held-out " + ", ".join(f"{k2} {v:.4f}" for k2, v in m.items() if isinstance(v, float)))
    score = "binary_accuracy" if task == "multilabel" else "top1"
    values = np.array([f.get(score, 0.0) for f in per_fold], float)
    best = int(values.argmax())
    report = {"k": cfg.cv, "grouped_by": "listing_id", "metric": score, "folds": per_fold,
              "mean": float(values.mean()), "std": float(values.std()), "best_fold": best + 1,
              "best": float(values[best])}
    from models.classifier import OOF_FILE

    report["out_of_fold"] = {"file": OOF_FILE, "n": len(oof_ids),
                             "splits": {sp: sum(split_of[i] == sp for i in oof_ids) for sp in splits}}
    log(f"cross-validation ({cfg.cv} folds grouped by listing): {score} mean {values.mean():.4f} ± "
        f"{values.std():.4f}, best fold {best + 1} ({values[best]:.4f}); out-of-fold logits of "
        f"{len(oof_ids)} train+val images kept for the label-issue finders")
    logits_all = np.concatenate(oof_logits) if oof_logits else np.zeros((0, len(names)), np.float32)
    return results, report, oof_bytes(oof_ids, [split_of[i] for i in oof_ids], oof_folds, logits_all)


# ---------------------------------------------------------------------------------------
# Prefect task (thin): a retried run resumes from its checkpoint
# ---------------------------------------------------------------------------------------
@task(name="train-classifier", retries=1, retry_delay_seconds=10, cache_policy=NO_CACHE)
def train_task(storage: str | None, config: dict[str, Any], argv: list[str] | None = None,
               progress: Callable[[float, str], None] | None = None) -> dict[str, Any]:
    from prefect import get_run_logger

    logger = get_run_logger()
    with gpu_slot():  # one model stage per GPU at a time (the `gpu` global concurrency limit)
        return train_classifier(storage, TrainSettings(**config), argv, log=lambda m: (print(m), logger.debug(m)),
                                progress=progress)
