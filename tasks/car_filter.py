"""Car filter stage: cached batch scoring of the clean manifest.

:func:`score_shard_to_storage` runs the car filter's predictor
(:class:`models.car_filter.CarFilterPredictor`: fp16 and large batches on a GPU, OpenVINO
on a CPU) over one shard, the bytes read from storage in a thread pool
(:func:`fetch_images`) and decoded in tf.data at a reduced JPEG scale, and writes
``work/car_filter/<content key>.parquet``; :func:`apply_threshold` adds ``p_car`` to the
clean manifest and drops rows below the threshold with reason ``no_car``. The shard task
is keyed on (stage, model version, sorted image ids, config), so a rerun does no inference
and a new model rescores all. Inference holds a slot of the Prefect global concurrency
limit ``gpu`` (when the limit does not exist, or there is no Prefect API, it just runs).

The labelling kit is :mod:`tasks.labelling`, training :mod:`tasks.car_filter_train`, the
threshold metrics :mod:`tasks.evaluation`.
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from prefect import task

from carflow.caching import content_key
from carflow.manifest import DROPPED, KEPT, to_pandas
from carflow.registry import MAKE_HINTS, Registry, RegistryError
from carflow.settings import CarFilterSettings
from carflow.storage import Storage, open_storage
from models.car_filter import CarFilterPredictor, has_gpu
from tasks.retry import RETRY
from tasks.shards import gpu_slot

log = logging.getLogger(__name__)

STAGE = "car_filter"
#: bump when decoding/scoring code changes in a way that changes ``p_car``
CODE_VERSION = "1"
REASON = "no_car"


def fetch_images(store: Storage, image_ids: list[str], workers: int = 16, window: int = 256) -> Iterator[bytes]:
    """The stored bytes of ``image_ids``, in order, read in a thread pool with at most
    ``window`` reads in flight; a missing image is ``b""`` (it fails to decode, so it gets
    no score: reason ``not_scored``)."""

    def get(image_id: str) -> bytes:
        try:
            return store.get_image(image_id)
        except KeyError:
            return b""

    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: list = []
        for image_id in image_ids:
            pending.append(pool.submit(get, image_id))
            if len(pending) >= window:
                yield pending.pop(0).result()
        for fut in pending:
            yield fut.result()


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


def score_shard_to_storage(
    store: Storage,
    image_ids: list[str],
    model_uri: str,
    model_version: str,
    config: dict[str, Any],
) -> dict[str, Any]:
    """Score one shard and store ``image_id, p_car`` under ``work/car_filter/<key>.parquet``."""
    key = f"work/{STAGE}/{score_key(model_version, image_ids, config)}.parquet"
    predictor = CarFilterPredictor.load(model_uri, config.get("runtime", "keras"), config.get("precision", "fp32"),
                                        float(config.get("alpha", 1.0)), version=model_version)
    batch = int(config.get("batch_size", 64))
    if has_gpu():
        batch = max(batch, int(config.get("gpu_batch_size", 512)))
    t0 = time.monotonic()
    p = predict_ids(predictor, store, image_ids, batch)
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
