"""Training the car/no-car filter (beside the detector's fine-tune, ``tasks/detector_train.py``).

:func:`train_car_filter`: labels (``image_id,label``) → tf.data from the images' bytes in
storage (decoded as the scoring stage decodes them: :func:`models.car_filter.decode_resize`),
a stratified seeded train/val split, class weights, early stopping → a new version
``models/car_filter/<version>/`` in the registry with ``model.keras``, ``metrics.json``
(threshold table from :mod:`tasks.evaluation`), ``split.csv`` and ``meta.json`` (the
config, the command that made it and the metrics summary), then the ``latest`` pointer.

Training holds a slot of the Prefect global concurrency limit ``gpu`` (when the limit does
not exist, or there is no Prefect API, it just runs).
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from carflow.frameworks import import_keras, import_tensorflow
from carflow.registry import Registry, Version, new_version_id
from carflow.settings import CarFilterSettings
from carflow.storage import Storage, open_storage
from models.car_filter import build_car_filter, decode_resize, has_gpu
from tasks.car_filter import STAGE, fetch_images
from tasks.evaluation import metrics_at, threshold_table
from tasks.labelling import LABELS
from tasks.shards import gpu_slot


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


def model_version(labels: pd.DataFrame, cfg: CarFilterSettings, extra: dict[str, Any] | None = None) -> str:
    """``<UTC timestamp>-<hash>``: the hash covers the label set, the config and the
    weights spec (two trainings on the same inputs share the hash, not the version)."""
    h = hashlib.sha256()
    for image_id, label in sorted(zip(labels["image_id"], labels["label"], strict=True)):
        h.update(f"{image_id}\t{label}\n".encode())
    h.update(json.dumps({"cfg": cfg.model_dump(mode="json"), "extra": extra or {}}, sort_keys=True).encode())
    return new_version_id(h.hexdigest())


def save_model_version(
    store: Storage,
    model: Any,
    version: str,
    cfg: CarFilterSettings,
    config: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    split: pd.DataFrame | None = None,
    set_latest: bool = True,
) -> Version:
    """Register ``model`` as car filter ``version`` (:class:`carflow.registry.Registry`):
    ``models/car_filter/<version>/model.keras`` (+ ``metrics.json``, ``split.csv``), then
    ``meta.json`` (the config, the command, the metrics summary), then, with
    ``set_latest``, the ``latest`` pointer."""
    import tempfile

    registry = Registry(store)
    meta = {
        "stage": STAGE,
        "image_size": int(model.input_shape[1]),
        "alpha": cfg.alpha,
        "weights": cfg.weights,
        "settings": cfg.model_dump(mode="json"),
        **(config or {}),
    }
    if metrics is not None:
        meta["metrics"] = {k: v for k, v in metrics.items() if k not in ("thresholds", "history")}
    with tempfile.TemporaryDirectory(prefix="carflow-model-") as tmp:
        path = os.path.join(tmp, "model.keras")
        model.save(path)
        files: dict[str, Any] = {"model.keras": Path(path)}
        if metrics is not None:
            files["metrics.json"] = json.dumps(metrics, indent=2, sort_keys=True).encode()
        if split is not None:
            files["split.csv"] = split.to_csv(index=False).encode()
        stored = registry.put_version("car_filter", files, meta, version=version)
    if set_latest:
        registry.promote("car_filter", stored)
    return stored


def _load_training_bytes(store: Storage, ids: list[str]) -> list[bytes]:
    return list(fetch_images(store, ids))


def train_car_filter(
    store: Storage,
    labels_df: pd.DataFrame,
    cfg: CarFilterSettings,
    epochs: int | None = None,
    command: str | None = None,
    verbose: int = 0,
) -> dict[str, Any]:
    """Train the filter on ``labels_df`` (``image_id,label``) and register a new version
    (the ``latest`` pointer moves to it). Returns ``{"version", "uri", "model", "metrics",
    "counts"}``."""
    keras = import_keras()
    tf = import_tensorflow()

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
    at = metrics_at(y_val, p_val, cfg.threshold)
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
        "accuracy_at_0.5": metrics_at(y_val, p_val, 0.5)["accuracy"],
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
    stored = save_model_version(
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
        "uri": stored.uri(),
        "model": stored.uri("model.keras"),
        "metrics": {k: v for k, v in metrics.items() if k not in ("thresholds", "history")},
        "counts": data_counts,
        "class_balance": balance,
    }


def _augment(img, target):
    tf = import_tensorflow()

    img = tf.image.random_flip_left_right(img)
    img = tf.clip_by_value(tf.image.random_brightness(img, 20.0), 0.0, 255.0)
    return img, target


@task(name="car-filter-train", cache_policy=NO_CACHE)
def train_task(
    storage_uri: str | None, labels_df: pd.DataFrame, config: dict[str, Any],
    epochs: int | None = None, command: str | None = None,
) -> dict[str, Any]:
    with gpu_slot():
        return train_car_filter(open_storage(storage_uri), labels_df, CarFilterSettings(**config),
                                epochs=epochs, command=command)
