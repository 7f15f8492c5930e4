"""Car filter stage: batch scoring of the clean manifest, shard outputs kept in storage.

:func:`score_shard_to_storage` runs the car filter's predictor
(:class:`models.car_filter.CarFilterPredictor`: fp16 and large batches on a GPU, OpenVINO
on a CPU) over one shard, the bytes read from storage in a thread pool
(:func:`fetch_images`) and decoded in tf.data at a reduced JPEG scale, and writes
``work/car_filter/<content key>.parquet`` under the shard contract of :mod:`tasks.shards`;
:func:`apply_threshold` adds ``p_car`` to the clean manifest and drops rows below the
threshold with reason ``no_car``. The shards are keyed on (stage, model version, sorted
image ids, config; never the threshold), so a rerun does no inference, a new threshold
rescores nothing and a new model rescores all. Inference holds a slot of the Prefect global concurrency
limit ``gpu`` (when the limit does not exist, or there is no Prefect API, it just runs).

The labelling kit is :mod:`tasks.labelling`, training :mod:`tasks.car_filter_train`, the
threshold metrics :mod:`tasks.evaluation`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from prefect import task
from prefect.cache_policies import NO_CACHE

from carflow.keys import manifest_key
from carflow.manifest import (
    CAR_FILTER_SCHEMA,
    CLEAN_SCHEMA,
    DROPPED,
    KEPT,
    InputError,
    read_input,
    write_manifest,
)
from carflow.registry import MAKE_HINTS, Registry, RegistryError
from carflow.settings import CarFilterSettings
from carflow.storage import Storage, open_storage
from models.car_filter import CarFilterPredictor, has_gpu
from tasks.retry import RETRY
from tasks.shards import (
    ShardSpec,
    gpu_slot,
    load_shard_results,
    merge_results,
    put_column,
    read_images,
    run_shard,
    status_counts,
)

log = logging.getLogger(__name__)

STAGE = "car_filter"
#: bump when decoding/scoring code changes in a way that changes ``p_car``
CODE_VERSION = "1"
REASON = "no_car"
#: a scoring shard's rows
SCORES_SCHEMA = pa.schema([pa.field("image_id", pa.string()), pa.field("p_car", pa.float32())])


def fetch_images(store: Storage, image_ids: list[str], workers: int = 16, window: int = 256) -> Iterator[bytes]:
    """The stored bytes of ``image_ids``, in order (:func:`tasks.shards.read_images`: at most
    ``window`` reads in flight); a missing image is ``b""`` (it fails to decode, so it gets
    no score: reason ``not_scored``)."""
    return (data for _, data in read_images(store, image_ids, workers, window))


def predict_ids(
    predictor: CarFilterPredictor,
    store: Storage,
    image_ids: list[str],
    batch_size: int | None = None,
    io_workers: int = 16,
) -> np.ndarray:
    """``p_car`` for ``image_ids`` (NaN where the bytes are missing or undecodable): bytes
    read from storage in a thread pool (ordered, bounded window) → the predictor's tf.data
    decode → batches → one compiled forward pass."""
    bs = int(batch_size or predictor.batch_size)
    blobs = fetch_images(store, image_ids, io_workers, 4 * max(64, bs))
    return predictor.predict_encoded(blobs, count=len(image_ids), batch_size=bs)


# ---------------------------------------------------------------- scoring


#: the setting a car filter model spec comes from, for error messages
MODEL_SETTING = "car_filter.model [CARFLOW_CAR_FILTER__MODEL]"


def resolve_model(store: Storage, cfg: CarFilterSettings, model: str | None = None) -> dict[str, Any]:
    """Which model to score with, through the registry (:meth:`Registry.resolve`):
    ``model``, else ``cfg.model``, else ``latest`` — a version id, a version folder or its
    ``model.keras`` (path or URI). Returns ``{"model": URI of model.keras, "version",
    "image_size", "alpha"}``; a missing model raises :class:`RegistryError` naming
    ``car_filter.model`` and the command that trains one."""
    version = Registry(store).resolve("car_filter", model or cfg.model or "latest", setting=MODEL_SETTING)
    if not version.exists(version.main):
        raise RegistryError(f"car filter {version.version} ({MODEL_SETTING}): {version.uri(version.main)} does not "
                            f"exist; {MAKE_HINTS['car_filter']}")
    return {
        "model": version.uri(version.main),
        "version": version.version,
        "image_size": version.meta.get("image_size"),
        "alpha": version.meta.get("alpha", cfg.alpha),
    }


def scoring_config(cfg: CarFilterSettings, chosen: dict[str, Any]) -> dict[str, Any]:
    """What a scoring shard is keyed on and run with: the model's input size and width,
    the batch size, and the resolved runtime + precision (bf16/fp16 move ``p_car`` by
    ~1e-3, so a change of runtime rescores)."""
    from models.car_filter import resolve_runtime

    runtime, precision = resolve_runtime(cfg.runtime, cfg.precision)
    return {"alpha": chosen["alpha"], "image_size": chosen["image_size"], "batch_size": cfg.batch_size,
            "runtime": runtime, "precision": precision}


def score_spec(model_version: str, config: dict[str, Any]) -> ShardSpec:
    """The scoring shards' :class:`~tasks.shards.ShardSpec`: stage, code + model version,
    and only what changes ``p_car`` (batch sizes and the threshold do not)."""
    relevant = {k: v for k, v in config.items() if k not in ("batch_size", "gpu_batch_size")}
    return ShardSpec(STAGE, f"{CODE_VERSION}.{model_version}", relevant)


def score_shard_to_storage(
    store: Storage,
    image_ids: list[str],
    model_uri: str,
    model_version: str,
    config: dict[str, Any],
    refresh: bool = False,
) -> dict[str, Any]:
    """Score one shard under the shard contract (:func:`tasks.shards.run_shard`):
    ``image_id, p_car`` under ``work/car_filter/<content key>.parquet``; a shard already
    stored loads no model and runs no inference (unless ``refresh``)."""

    def compute(ids: list[str]) -> tuple[pa.Table, dict[str, Any]]:
        predictor = CarFilterPredictor.load(model_uri, config.get("runtime", "keras"),
                                            config.get("precision", "fp32"), float(config.get("alpha", 1.0)),
                                            version=model_version)
        batch = int(config.get("batch_size", 64))
        if has_gpu():
            batch = max(batch, int(config.get("gpu_batch_size", 512)))
        t0 = time.monotonic()
        p = predict_ids(predictor, store, ids, batch)
        seconds = time.monotonic() - t0
        table = pa.table(
            {"image_id": pa.array(ids, pa.string()), "p_car": pa.array(p, pa.float32(), mask=np.isnan(p))}
        )
        return table, {"not_scored": int(np.isnan(p).sum()), "seconds": round(seconds, 3), "batch_size": batch,
                       "model_version": model_version, "runtime": config.get("runtime", "keras"),
                       "precision": config.get("precision", "fp32")}

    return run_shard(store, score_spec(model_version, config), image_ids, compute, refresh=refresh)


@task(name="car-filter-shard", cache_policy=NO_CACHE, **RETRY.io())
def score_shard_task(
    storage_uri: str | None,
    image_ids: list[str],
    model_uri: str,
    model_version: str,
    config: dict[str, Any],
    refresh: bool = False,
) -> dict[str, Any]:
    """Keyed on (stage, model version, sorted image ids, config): a shard whose scores are
    in storage runs no inference, whatever Prefect's local state holds (unless
    ``refresh``); a new model rescores all."""
    with gpu_slot():
        return score_shard_to_storage(open_storage(storage_uri), image_ids, model_uri, model_version, config,
                                      refresh=refresh)


def apply_threshold(manifest: pa.Table, scores: pa.Table, threshold: float) -> pa.Table:
    """Add ``p_car`` to every row; kept rows below ``threshold`` → dropped, reason
    ``no_car``; kept rows without a score (undecodable, or never scored) → dropped,
    ``not_scored``. The threshold is applied here, never in the shards: changing it
    rescores nothing."""
    out = merge_results(manifest, scores.select(["image_id", "p_car"]), ["p_car"], "not_scored", only_kept=False)
    kept = pc.fill_null(pc.equal(out["status"], KEPT), False)
    p = out["p_car"].cast(pa.float32())
    low = pc.and_(kept, pc.fill_null(pc.less(p.cast(pa.float64()), threshold), False))
    lost = pc.and_(kept, pc.is_null(p))
    status = pc.if_else(pc.or_(low, lost), DROPPED, out["status"])
    reason = pc.if_else(low, REASON, pc.if_else(lost, "not_scored", out["reason"]))
    return put_column(put_column(put_column(out, "status", status), "reason", reason), "p_car", p)


@task(name="car-filter-threshold", cache_policy=NO_CACHE, retries=1)
def apply_threshold_task(storage_uri: str | None, source_key: str, source_hash: str, shard_keys: list[str],
                         threshold: float, prefix: str = "manifests") -> dict[str, Any]:
    """Read the input manifest (the one the flow planned from: ``source_hash``) and the
    scoring shards, apply the threshold, write ``manifests/car_filter/manifest.parquet``
    with its lineage; returns counts (no rows pass through Prefect)."""
    store = open_storage(storage_uri)
    source = read_input(store, source_key, CLEAN_SCHEMA, check=False)
    if source.hash != source_hash:
        raise InputError(f"{store.uri(source_key)} changed while the car filter ran: run "
                         "`carflow car-filter score` again")
    scores = load_shard_results(store, shard_keys, ["image_id", "p_car"], SCORES_SCHEMA)
    table = apply_threshold(source.table, scores, threshold)
    uri = write_manifest(store, manifest_key(STAGE, prefix=prefix), table, CAR_FILTER_SCHEMA,
                         lineage=source.lineage())
    return {"manifest": uri, **status_counts(table)}
