"""Car filter stage: the labelling kit, training, and cached batch scoring.

- Labelling kit: :func:`sample_for_labelling` (stratified by site and label among kept
  rows), :func:`write_labelling_kit` (``labels.csv`` + thumbnails + contact sheets) and
  :func:`import_labels` (the filled-in CSV, or a ``car/`` / ``no_car/`` folder tree).
- Training: :func:`train_car_filter` (tf.data from storage bytes, class weights, early
  stopping) exports ``<models_prefix>/<version>/model.keras`` + ``config.json`` +
  ``metrics.json`` + ``split.csv`` and points ``<models_prefix>/latest.json`` at it.
- Scoring: :func:`score_shard_to_storage` runs batch inference over one shard (bytes read
  in a thread pool, parallel decode at a reduced JPEG scale, prefetch; fp16 and large
  batches on a GPU, OpenVINO (bf16 on AMX CPUs) on a CPU) and writes ``work/car_filter/<content key>.parquet``;
  :func:`apply_threshold` adds ``p_car`` to the clean manifest and drops rows below the
  threshold with reason ``no_car``. The shard task is keyed on (stage, model version,
  sorted image ids, config), so a rerun does no inference and a new model rescores all.

Training and inference hold a slot of the Prefect global concurrency limit ``gpu`` (when
the limit does not exist, or there is no Prefect API, they just run).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import shlex
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from prefect import task
from prefect.cache_policies import NO_CACHE

from carflow.caching import content_key
from carflow.frameworks import import_keras, import_tensorflow
from carflow.manifest import DROPPED, KEPT, to_pandas
from carflow.settings import CarFilterSettings
from carflow.storage import Storage, open_storage
from tasks.report import contact_sheet
from tasks.retry import RETRY
from tasks.shards import gpu_slot

log = logging.getLogger(__name__)

STAGE = "car_filter"
#: bump when decoding/scoring code changes in a way that changes ``p_car``
CODE_VERSION = "1"
LABELS = ("car", "no_car")
REASON = "no_car"
THRESHOLDS = [round(t, 2) for t in np.arange(0.05, 0.951, 0.05)]
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp")


# ---------------------------------------------------------------- Prefect concurrency


# ---------------------------------------------------------------- labelling kit


def _kept_unique(df: pd.DataFrame) -> pd.DataFrame:
    kept = df[df["status"] == KEPT]
    order = ["first_seen", "image_id"] if "first_seen" in kept.columns else ["image_id"]
    return kept.sort_values(order, kind="stable").drop_duplicates("image_id").reset_index(drop=True)


def sample_for_labelling(df: pd.DataFrame, n: int, seed: int = 0) -> pd.DataFrame:
    """Up to ``n`` unique kept images, stratified by (site, label): each stratum gets its
    share of the sample (proportional allocation, systematic within a seeded shuffle,
    so every stratum with at least ``total / n`` images is represented)."""
    pool = _kept_unique(df)
    if pool.empty or n <= 0:
        return pool.iloc[:0].copy()
    if n >= len(pool):
        return pool.sort_values("image_id").reset_index(drop=True)
    rng = np.random.default_rng(seed)
    pool = pool.iloc[rng.permutation(len(pool))].reset_index(drop=True)
    strata = pool["site"].astype(str).fillna("") + "\0" + pool["label"].astype(str).fillna("")
    rank = pool.groupby(strata, sort=False).cumcount()
    size = strata.map(strata.value_counts())
    # position of each row inside its stratum in (0, 1): taking the n smallest positions
    # takes about n * size / total rows of each stratum (ties broken at random)
    pool["_pos"] = (rank + 0.5) / size
    pool["_tie"] = rng.random(len(pool))
    out = pool.sort_values(["_pos", "_tie"], kind="stable").head(n).drop(columns=["_pos", "_tie"])
    return out.sort_values("image_id").reset_index(drop=True)


def _thumbnail(data: bytes, size: int = 256) -> bytes | None:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.format == "JPEG":
                im.draft("RGB", (size, size))
            im.thumbnail((size, size))
            out = io.BytesIO()
            im.convert("RGB").save(out, "JPEG", quality=85)
            return out.getvalue()
    except Exception:  # noqa: BLE001 - the contact sheet shows it as undecodable
        return None


def write_labelling_kit(
    store: Storage, df_sample: pd.DataFrame, out_prefix: str, per_sheet: int = 60
) -> dict[str, Any]:
    """Write a labelling kit under ``out_prefix``: ``labels.csv`` (``image_id,label`` with
    the label empty, plus ``site,listing_id,thumb`` for context), ``thumbs/<image_id>.jpg``
    and ``contact_sheet-NNN.png`` pages (thumbnails captioned with the id prefix)."""
    out_prefix = out_prefix.rstrip("/")
    ids = df_sample["image_id"].tolist()

    def fetch(image_id: str) -> bytes | None:
        try:
            return store.get_image(image_id)
        except KeyError:
            return None

    thumbs: dict[str, bytes | None] = {}
    with ThreadPoolExecutor(max_workers=8) as pool:
        for image_id, data in zip(ids, pool.map(fetch, ids), strict=True):
            thumb = _thumbnail(data) if data else None
            thumbs[image_id] = thumb
            if thumb is not None:
                store.put(f"{out_prefix}/thumbs/{image_id}.jpg", thumb, content_type="image/jpeg")
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["image_id", "label", "site", "listing_id", "thumb"])
    for row in df_sample.itertuples():
        writer.writerow(
            [row.image_id, "", getattr(row, "site", ""), getattr(row, "listing_id", ""),
             f"thumbs/{row.image_id}.jpg"]
        )
    store.put(f"{out_prefix}/labels.csv", buf.getvalue().encode(), content_type="text/csv")
    sheets = []
    for page, start in enumerate(range(0, max(len(ids), 1), per_sheet), 1):
        chunk = ids[start : start + per_sheet]
        png = contact_sheet(
            [(thumbs.get(i), i[:12]) for i in chunk],
            title=f"label car / no_car — page {page} ({len(ids)} images)",
        )
        key = f"{out_prefix}/contact_sheet-{page:03d}.png"
        store.put(key, png, content_type="image/png")
        sheets.append(store.uri(key))
    return {
        "labels_csv": store.uri(f"{out_prefix}/labels.csv"),
        "images": len(ids),
        "thumbs": sum(t is not None for t in thumbs.values()),
        "contact_sheets": sheets,
    }


def _parse_labels_csv(text: str, where: str) -> pd.DataFrame:
    reader = csv.DictReader(io.StringIO(text))
    if not reader.fieldnames or not {"image_id", "label"} <= set(reader.fieldnames):
        raise ValueError(f"{where}: a labels CSV needs the columns image_id,label (got {reader.fieldnames})")
    rows = []
    for line, rec in enumerate(reader, 2):
        image_id = (rec.get("image_id") or "").strip()
        label = (rec.get("label") or "").strip().lower().replace("-", "_").replace(" ", "_")
        if not image_id or not label:
            continue  # not labelled (yet)
        if label not in LABELS:
            raise ValueError(f"{where}:{line}: label {rec.get('label')!r} for {image_id} is not one of {LABELS}")
        rows.append((image_id, label))
    return pd.DataFrame(rows, columns=["image_id", "label"])


def import_labels(source: str) -> pd.DataFrame:
    """Labels → DataFrame ``image_id,label`` (label ∈ {car, no_car}).

    ``source`` is a ``.csv`` file (the labelling kit's ``labels.csv``, rows with an empty
    label are skipped) or a folder / ``s3://`` prefix holding ``car/`` and ``no_car/``
    with files named ``<image_id>.<ext>`` (e.g. the kit's thumbnails sorted by hand)."""
    text = os.fspath(source)
    if text.lower().endswith(".csv"):
        head, _, name = text.rpartition("/")
        data = open_storage(head or ".").get(name)
        df = _parse_labels_csv(data.decode("utf-8-sig"), text)
    else:
        store = open_storage(text)
        rows = []
        for label in LABELS:
            for key in store.list(f"{label}/"):
                name = key.rsplit("/", 1)[-1]
                if name.startswith(".") or not name.lower().endswith(IMAGE_EXTS):
                    continue
                rows.append((name.split(".", 1)[0], label))
        if not rows:
            raise ValueError(f"{text}: no labelled images (expected car/<image_id>.jpg and no_car/<image_id>.jpg)")
        df = pd.DataFrame(rows, columns=["image_id", "label"])
    conflicts = df.groupby("image_id")["label"].nunique()
    conflicts = conflicts[conflicts > 1]
    if len(conflicts):
        raise ValueError(f"{text}: {len(conflicts)} image(s) labelled both car and no_car, e.g. {conflicts.index[0]}")
    return df.drop_duplicates("image_id").sort_values("image_id").reset_index(drop=True)


# ---------------------------------------------------------------- decoding (tf.data)


def decode_resize(data, image_size: int):
    """Encoded bytes (a scalar string tensor) → float32 ``image_size``² RGB in [0, 255].
    JPEGs are decoded at the largest DCT scale (1/2, 1/4, 1/8) that still leaves the short
    side ≥ ``image_size`` ("decode once, small"); other formats through ``decode_image``."""
    tf = import_tensorflow()

    def jpeg():
        shape = tf.image.extract_jpeg_shape(data)
        short = tf.minimum(shape[0], shape[1])
        idx = (
            tf.cast(short >= 2 * image_size, tf.int32)
            + tf.cast(short >= 4 * image_size, tf.int32)
            + tf.cast(short >= 8 * image_size, tf.int32)
        )
        branches = [
            (lambda r=r: tf.io.decode_jpeg(data, channels=3, ratio=r, dct_method="INTEGER_FAST"))
            for r in (1, 2, 4, 8)
        ]
        return tf.switch_case(idx, branches)

    def other():
        return tf.io.decode_image(data, channels=3, expand_animations=False)

    img = tf.cond(tf.io.is_jpeg(data), jpeg, other)
    img = tf.image.resize(img, (image_size, image_size))
    img.set_shape((image_size, image_size, 3))
    return img


def _ordered_map(fn: Callable[[str], Any], items: list[str], workers: int, window: int) -> Iterator[Any]:
    """``map(fn, items)`` in a thread pool, in order, with at most ``window`` in flight."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: list = []
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= window:
                yield pending.pop(0).result()
        for fut in pending:
            yield fut.result()


def _fetch(store: Storage) -> Callable[[str], bytes]:
    def get(image_id: str) -> bytes:
        try:
            return store.get_image(image_id)
        except KeyError:
            return b""  # fails to decode → the image gets no score (reason not_scored)

    return get


def has_gpu() -> bool:
    tf = import_tensorflow()

    return bool(tf.config.list_physical_devices("GPU"))


def predict_ids(
    model: Any,
    store: Storage,
    image_ids: list[str],
    image_size: int,
    batch_size: int,
    io_workers: int = 16,
) -> np.ndarray:
    """``p_car`` for ``image_ids`` (NaN where the bytes are missing or undecodable).

    tf.data: bytes read from storage in a thread pool (ordered, bounded window) →
    parallel decode/resize (AUTOTUNE) → batch → prefetch; one compiled forward pass."""
    tf = import_tensorflow()

    out = np.full(len(image_ids), np.nan, dtype=np.float32)
    if not image_ids:
        return out
    get = _fetch(store)
    chunk = max(64, batch_size)

    def gen():
        # bytes arrive in order from the thread pool; one element per chunk, so the Python
        # side costs per chunk, not per image (the per-image work is in tf.data's threads)
        idx: list[int] = []
        blobs: list[bytes] = []
        for i, data in enumerate(_ordered_map(get, image_ids, io_workers, 4 * chunk)):
            idx.append(i)
            blobs.append(data)
            if len(idx) == chunk:
                yield np.asarray(idx, np.int64), np.asarray(blobs, dtype=object)
                idx, blobs = [], []
        if idx:
            yield np.asarray(idx, np.int64), np.asarray(blobs, dtype=object)

    ds = tf.data.Dataset.from_generator(
        gen,
        output_signature=(tf.TensorSpec((None,), tf.int64), tf.TensorSpec((None,), tf.string)),
    )
    ds = (
        ds.prefetch(2)
        .unbatch()
        .map(lambda i, b: (i, decode_resize(b, image_size)), num_parallel_calls=tf.data.AUTOTUNE)
        .ignore_errors()
        .batch(batch_size)
        .prefetch(tf.data.AUTOTUNE)
    )
    forward = _forward(model)
    for idx, x in ds:
        p = forward(x)
        out[idx.numpy()] = np.asarray(p, dtype=np.float32).reshape(-1)
    return out


_FORWARD: dict[int, tuple[Any, Any]] = {}


def _forward(model: Any) -> Any:
    """One compiled forward pass per model (kept across shards: no retracing per call)."""
    tf = import_tensorflow()

    from models.car_filter import OpenVinoModel

    if isinstance(model, OpenVinoModel):
        return lambda x: model(x.numpy())
    key = id(model)
    if key not in _FORWARD or _FORWARD[key][0] is not model:
        _FORWARD.clear()
        _FORWARD[key] = (model, tf.function(lambda x: model(x, training=False), reduce_retracing=True))
    return _FORWARD[key][1]


# ---------------------------------------------------------------- training


def split_train_val(labels: pd.DataFrame, val_fraction: float, seed: int) -> pd.Series:
    """A stratified, seeded split: ``train`` / ``val`` per row (≥ 1 val image per class)."""
    split = pd.Series("train", index=labels.index)
    for _, group in labels.groupby("label"):
        order = sorted(
            group.index,
            key=lambda i: hashlib.sha256(f"{seed}:{labels.at[i, 'image_id']}".encode()).hexdigest(),
        )
        n_val = max(1, round(len(order) * val_fraction)) if len(order) > 1 else 0
        split.loc[order[:n_val]] = "val"
    return split


def threshold_table(y_car: np.ndarray, p_car: np.ndarray) -> list[dict[str, float]]:
    """Precision/recall of "car" (p ≥ t), recall of no_car (p < t) and accuracy per threshold."""
    return [_at(y_car, p_car, t) for t in THRESHOLDS]


def _at(y_car: np.ndarray, p_car: np.ndarray, t: float) -> dict[str, float]:
    y = np.asarray(y_car).astype(bool)
    pred = np.asarray(p_car) >= t
    tp = int((pred & y).sum())
    fp = int((pred & ~y).sum())
    fn = int((~pred & y).sum())
    tn = int((~pred & ~y).sum())
    n = max(len(y), 1)
    return {
        "threshold": float(t),
        "accuracy": (tp + tn) / n,
        "precision": tp / (tp + fp) if tp + fp else 1.0,
        "recall": tp / (tp + fn) if tp + fn else 1.0,
        "no_car_recall": tn / (tn + fp) if tn + fp else 1.0,
        "car_false_drop_rate": fn / (tp + fn) if tp + fn else 0.0,
        "kept_fraction": float(pred.mean()) if len(pred) else 0.0,
    }


def model_version(labels: pd.DataFrame, cfg: CarFilterSettings, extra: dict[str, Any] | None = None) -> str:
    """``<UTC timestamp>-<hash>``: the hash covers the label set, the config and the
    weights spec (two trainings on the same inputs share the hash, not the version)."""
    h = hashlib.sha256()
    for image_id, label in sorted(zip(labels["image_id"], labels["label"], strict=True)):
        h.update(f"{image_id}\t{label}\n".encode())
    h.update(json.dumps({"cfg": cfg.model_dump(mode="json"), "extra": extra or {}}, sort_keys=True).encode())
    return f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{h.hexdigest()[:10]}"


def save_model_version(
    store: Storage,
    model: Any,
    version: str,
    cfg: CarFilterSettings,
    config: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    split: pd.DataFrame | None = None,
    set_latest: bool = True,
) -> str:
    """Write ``<models_prefix>/<version>/model.keras`` (+ ``config.json``, ``metrics.json``,
    ``split.csv``) to storage; returns the version folder's URI."""
    import tempfile

    prefix = f"{cfg.models_prefix.rstrip('/')}/{version}"
    with tempfile.TemporaryDirectory(prefix="carflow-model-") as tmp:
        path = os.path.join(tmp, "model.keras")
        model.save(path)
        with open(path, "rb") as fh:
            store.put(f"{prefix}/model.keras", fh.read(), content_type="application/octet-stream")
    config = {
        "version": version,
        "stage": STAGE,
        "image_size": int(model.input_shape[1]),
        "alpha": cfg.alpha,
        "weights": cfg.weights,
        "settings": cfg.model_dump(mode="json"),
        **(config or {}),
    }
    store.put_text(f"{prefix}/config.json", json.dumps(config, indent=2, sort_keys=True, default=str))
    if metrics is not None:
        store.put_text(f"{prefix}/metrics.json", json.dumps(metrics, indent=2, sort_keys=True))
    if split is not None:
        store.put_text(f"{prefix}/split.csv", split.to_csv(index=False))
    if set_latest:
        store.put_text(
            f"{cfg.models_prefix.rstrip('/')}/latest.json",
            json.dumps({"version": version, "model": store.uri(f"{prefix}/model.keras")}),
        )
    return store.uri(prefix)


def _load_training_bytes(store: Storage, ids: list[str]) -> list[bytes]:
    return list(_ordered_map(_fetch(store), ids, 16, 256))


def train_car_filter(
    store: Storage,
    labels_df: pd.DataFrame,
    cfg: CarFilterSettings,
    out_prefix: str | None = None,
    epochs: int | None = None,
    command: str | None = None,
    verbose: int = 0,
) -> dict[str, Any]:
    """Train the filter on ``labels_df`` (``image_id,label``) and export a new version.

    ``out_prefix`` overrides ``cfg.models_prefix``. Returns ``{"version", "uri", "model",
    "metrics", "counts"}``."""
    keras = import_keras()
    tf = import_tensorflow()

    from models.car_filter import build_car_filter

    if out_prefix:
        cfg = cfg.model_copy(update={"models_prefix": out_prefix})
    epochs = int(epochs or cfg.epochs)
    labels = labels_df[["image_id", "label"]].drop_duplicates("image_id").reset_index(drop=True)
    data = _load_training_bytes(store, labels["image_id"].tolist())
    present = np.array([bool(b) for b in data])
    missing = int((~present).sum())
    labels = labels[present].reset_index(drop=True)
    data = [b for b, ok in zip(data, present, strict=True) if ok]
    counts = labels["label"].value_counts().to_dict()
    if any(counts.get(lbl, 0) < 2 for lbl in LABELS):
        raise ValueError(f"need at least 2 images of each of {LABELS} to train, got {counts}")
    labels["split"] = split_train_val(labels, cfg.val_fraction, cfg.seed)
    y = (labels["label"] == "car").to_numpy(np.float32)
    is_val = (labels["split"] == "val").to_numpy()

    keras.utils.set_random_seed(cfg.seed)
    size = cfg.image_size
    autotune = tf.data.AUTOTUNE

    n_train = int((~is_val).sum())
    n_car = int(y[~is_val].sum())
    n_no = n_train - n_car
    class_weight = {0: n_train / (2 * n_no), 1: n_train / (2 * n_car)}
    # validation loss is NOT class-weighted: weighting it too (tried) pushed p_car of cars
    # below the 0.7 threshold (val accuracy 0.93-0.98 vs 0.97-0.98 unweighted)
    w_val = np.ones(len(y), np.float32)

    def dataset(mask: np.ndarray, train: bool):
        idx = np.where(mask)[0]
        ds = tf.data.Dataset.from_tensor_slices(
            (tf.constant([data[i] for i in idx]), y[idx], w_val[idx].astype(np.float32))
        )
        ds = ds.map(lambda b, t, w: (decode_resize(b, size), t, w), num_parallel_calls=autotune).cache()
        if train:
            ds = ds.shuffle(len(idx), seed=cfg.seed, reshuffle_each_iteration=True).map(
                lambda x, t, w: _augment(x, t), num_parallel_calls=autotune
            )
        return ds.batch(cfg.batch_size).prefetch(autotune)

    train_ds, val_ds = dataset(~is_val, True), dataset(is_val, False)

    model = build_car_filter(cfg.weights, size, cfg.alpha)
    model.compile(
        optimizer=keras.optimizers.Adam(cfg.learning_rate),
        loss="binary_crossentropy",
        metrics=["accuracy"],
    )
    stop = keras.callbacks.EarlyStopping(
        monitor="val_loss", patience=cfg.patience, restore_best_weights=True
    )
    slower = keras.callbacks.ReduceLROnPlateau(
        monitor="val_loss", factor=0.3, patience=max(1, cfg.patience // 2), min_lr=cfg.learning_rate / 100
    )
    t0 = time.monotonic()
    history = model.fit(
        train_ds, validation_data=val_ds, epochs=epochs, class_weight=class_weight,
        callbacks=[stop, slower], verbose=verbose,
    )
    train_s = time.monotonic() - t0
    p_val = model.predict(val_ds.map(lambda x, t, w: x), verbose=0).reshape(-1)
    y_val = y[is_val]
    at = _at(y_val, p_val, cfg.threshold)
    val_loss = history.history.get("val_loss", [])
    metrics = {
        "split": "val",
        "threshold": cfg.threshold,
        "n_val": int(is_val.sum()),
        "accuracy": at["accuracy"],
        "precision": at["precision"],
        "recall": at["recall"],
        "no_car_recall": at["no_car_recall"],
        "car_false_drop_rate": at["car_false_drop_rate"],
        "accuracy_at_0.5": _at(y_val, p_val, 0.5)["accuracy"],
        "thresholds": threshold_table(y_val, p_val),
        "epochs_run": len(val_loss),
        "best_epoch": int(np.argmin(val_loss)) + 1 if val_loss else None,
        "history": {k: [float(v) for v in vs] for k, vs in history.history.items()},
    }
    balance = {
        "train": {"car": n_car, "no_car": n_no},
        "val": {"car": int(y_val.sum()), "no_car": int(len(y_val) - y_val.sum())},
        "class_weight": {"no_car": class_weight[0], "car": class_weight[1]},
    }
    data_counts = {"labels": len(labels_df), "missing_images": missing, "used": len(labels),
                   "train": n_train, "val": int(is_val.sum())}
    version = model_version(labels, cfg, {"epochs": epochs})
    uri = save_model_version(
        store,
        model,
        version,
        cfg,
        config={
            "command": command or shlex.join(sys.argv),
            "epochs": epochs,
            "class_balance": balance,
            "data_counts": data_counts,
            "train_seconds": round(train_s, 1),
            "tensorflow": tf.__version__,
            "keras": keras.__version__,
            "device": "gpu" if has_gpu() else "cpu",
        },
        metrics=metrics,
        split=labels[["image_id", "label", "split"]],
    )
    return {
        "version": version,
        "uri": uri,
        "model": f"{uri}/model.keras",
        "metrics": {k: v for k, v in metrics.items() if k not in ("thresholds", "history")},
        "counts": data_counts,
        "class_balance": balance,
    }


def _augment(img, target):
    tf = import_tensorflow()

    img = tf.image.random_flip_left_right(img)
    img = tf.clip_by_value(tf.image.random_brightness(img, 20.0), 0.0, 255.0)
    return img, target


# ---------------------------------------------------------------- scoring


def resolve_model(store: Storage, cfg: CarFilterSettings, model: str | None = None) -> dict[str, Any]:
    """Which model to score with: ``model`` (a version folder or its ``model.keras``, path
    or URI), else ``cfg.model``, else ``<models_prefix>/latest.json`` in ``store``.
    Returns ``{"model": URI of model.keras, "version", "image_size", "alpha"}``."""
    from models.car_filter import WeightsError, _split_uri

    spec = model or cfg.model
    if not spec:
        key = f"{cfg.models_prefix.rstrip('/')}/latest.json"
        try:
            latest = json.loads(store.get_text(key))
        except KeyError:
            raise WeightsError(
                f"no car filter model: {store.uri(key)} does not exist; train one "
                "(python -m flows.car_filter train) or set car_filter.model [CARFLOW_CAR_FILTER__MODEL]"
            ) from None
        spec = latest["model"]
    if "://" not in spec:
        spec = os.path.abspath(os.path.expanduser(spec))
    if not spec.endswith(".keras"):
        spec = spec.rstrip("/") + "/model.keras"
    head, _ = _split_uri(spec)
    folder = open_storage(head)
    try:
        config = json.loads(folder.get_text("config.json"))
    except KeyError:
        config = {}
    version = config.get("version") or head.rstrip("/").rsplit("/", 1)[-1]
    return {
        "model": spec,
        "version": version,
        "image_size": config.get("image_size"),
        "alpha": config.get("alpha", cfg.alpha),
    }


_MODEL_CACHE: dict[str, Any] = {}


def _inference_model(model_uri: str, alpha: float, runtime: str = "keras", precision: str = "fp32") -> Any:
    """The loaded model for ``model_uri`` in a resolved runtime/precision (see
    :func:`models.car_filter.resolve_runtime`); one kept per process."""
    key = f"{model_uri}|{runtime}|{precision}"
    if key not in _MODEL_CACHE:
        from models.car_filter import for_runtime, load_model_file

        model = load_model_file(model_uri)
        _MODEL_CACHE.clear()
        _MODEL_CACHE[key] = for_runtime(model, runtime, precision, alpha)
    return _MODEL_CACHE[key]


def scoring_config(cfg: CarFilterSettings, chosen: dict[str, Any]) -> dict[str, Any]:
    """What a scoring shard is keyed on and run with: the model's input size and width,
    the batch size, and the resolved runtime + precision (bf16/fp16 move ``p_car`` by
    ~1e-3, so a change of runtime rescores)."""
    from models.car_filter import resolve_runtime

    runtime, precision = resolve_runtime(cfg.runtime, cfg.precision)
    return {"alpha": chosen["alpha"], "image_size": chosen["image_size"], "batch_size": cfg.batch_size,
            "runtime": runtime, "precision": precision}


def score_shard_to_storage(
    store: Storage,
    image_ids: list[str],
    model_uri: str,
    model_version: str,
    config: dict[str, Any],
) -> dict[str, Any]:
    """Score one shard and store ``image_id, p_car`` under ``work/car_filter/<key>.parquet``."""
    key = f"work/{STAGE}/{score_key(model_version, image_ids, config)}.parquet"
    model = _inference_model(model_uri, float(config.get("alpha", 1.0)), config.get("runtime", "keras"),
                             config.get("precision", "fp32"))
    size = int(model.input_shape[1])
    batch = int(config.get("batch_size", 64))
    if has_gpu():
        batch = max(batch, int(config.get("gpu_batch_size", 512)))
    t0 = time.monotonic()
    p = predict_ids(model, store, image_ids, size, batch)
    seconds = time.monotonic() - t0
    table = pa.table(
        {"image_id": pa.array(image_ids, pa.string()), "p_car": pa.array(p, pa.float32(), mask=np.isnan(p))}
    )
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    store.put(key, buf.getvalue())
    stats = {"images": len(image_ids), "not_scored": int(np.isnan(p).sum()), "seconds": round(seconds, 3),
             "batch_size": batch, "model_version": model_version,
             "runtime": config.get("runtime", "keras"), "precision": config.get("precision", "fp32")}
    store.put_text(key.removesuffix(".parquet") + ".stats.json", json.dumps(stats, sort_keys=True))
    return {"key": key, "stats": stats}


def score_key(model_version: str, image_ids: Iterable[str], config: dict[str, Any]) -> str:
    """Content key of a scoring shard: stage, code + model version, sorted ids, config
    (only what changes ``p_car``; batch sizes and the threshold do not)."""
    relevant = {k: v for k, v in config.items() if k not in ("batch_size", "gpu_batch_size")}
    return content_key(STAGE, f"{CODE_VERSION}.{model_version}", image_ids, relevant)


def _score_cache_key(_context: Any, parameters: dict[str, Any]) -> str:
    """The shard's content key plus the *output* storage's URI (as ``tasks/clean.py``):
    the same images scored into another bucket must run again, or the cached result would
    point at a shard file that does not exist there."""
    output = open_storage(parameters.get("storage_uri")).uri()
    config = {"config": parameters["config"], "output": output}
    return score_key(parameters["model_version"], parameters["image_ids"], config)


@task(name="car-filter-shard", cache_key_fn=_score_cache_key, persist_result=True, **RETRY.io())
def score_shard_task(
    storage_uri: str | None,
    image_ids: list[str],
    model_uri: str,
    model_version: str,
    config: dict[str, Any],
) -> dict[str, Any]:
    """Cached on (stage, model version, sorted image ids, config): a rerun with unchanged
    inputs and model returns the stored result and runs no inference."""
    with gpu_slot():
        return score_shard_to_storage(open_storage(storage_uri), image_ids, model_uri, model_version, config)


@task(name="car-filter-train", cache_policy=NO_CACHE)
def train_task(
    storage_uri: str | None, labels_df: pd.DataFrame, config: dict[str, Any],
    epochs: int | None = None, command: str | None = None,
) -> dict[str, Any]:
    with gpu_slot():
        return train_car_filter(open_storage(storage_uri), labels_df, CarFilterSettings(**config),
                                epochs=epochs, command=command)


def load_scores(store: Storage, keys: list[str]) -> pd.DataFrame:
    frames = [to_pandas(pq.read_table(io.BytesIO(store.get(k)))) for k in keys]
    frames = [f for f in frames if not f.empty]
    if not frames:
        return pd.DataFrame({"image_id": pd.Series(dtype="string"), "p_car": pd.Series(dtype="float32")})
    return pd.concat(frames, ignore_index=True).drop_duplicates("image_id", keep="last")


def apply_threshold(manifest: pd.DataFrame, scores: pd.DataFrame, threshold: float) -> pd.DataFrame:
    """Add ``p_car`` to every row; kept rows below ``threshold`` → dropped, reason
    ``no_car``; kept rows without a score (undecodable) → dropped, ``not_scored``."""
    df = manifest.drop(columns=["p_car"], errors="ignore").merge(
        scores[["image_id", "p_car"]], how="left", on="image_id"
    )
    was_kept = df["status"] == KEPT
    p = df["p_car"].astype("float64")
    low = was_kept & (p < threshold)
    df.loc[low, "status"] = DROPPED
    df.loc[low, "reason"] = REASON
    lost = was_kept & p.isna()
    df.loc[lost, "status"] = DROPPED
    df.loc[lost, "reason"] = "not_scored"
    df["p_car"] = p.astype("float32")
    return df
