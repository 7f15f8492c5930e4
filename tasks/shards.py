"""Shards, shared by every per-image stage (clean, car filter, crop), and the ``gpu``
concurrency slot the model stages hold (:func:`gpu_slot`).

Sharding is stable as data grows: unique kept images are ordered by when they were first
seen, then cut into fixed-size shards. New listings append images at the end, so only the
tail shard and the new shards get new cache keys.

:func:`run_shards` submits one cached Prefect task per shard. Each shard task writes its
rows to storage and returns ``{"key": ...}``; a cached result whose file has since been
deleted from storage is run again (``refresh_cache``) instead of failing the flow, and so
is a cached result marked ``incomplete`` (an input was missing: a transient miss is not
kept forever).
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import pandas as pd
import pyarrow.parquet as pq

from carflow.manifest import KEPT, to_pandas
from carflow.settings import get_settings
from carflow.storage import Storage
from tasks.retry import with_retry_policy

log = logging.getLogger(__name__)


def plan_shards(manifest: pd.DataFrame, shard_size: int) -> list[list[str]]:
    """Unique kept image ids, ordered by first appearance (then id), in shards."""
    kept = manifest[manifest["status"] == KEPT]
    if kept.empty:
        return []
    order = kept.groupby("image_id", sort=False)["first_seen"].min().reset_index()
    order = order.sort_values(["first_seen", "image_id"], kind="stable")
    ids = order["image_id"].tolist()
    return [ids[i : i + shard_size] for i in range(0, len(ids), shard_size)]


def load_shard_results(storage: Storage, keys: list[str]) -> pd.DataFrame:
    frames = [to_pandas(pq.read_table(io.BytesIO(storage.get(k)))) for k in keys]
    frames = [f for f in frames if not f.empty]
    if not frames:
        return pd.DataFrame({"image_id": pd.Series(dtype="string")})
    return pd.concat(frames, ignore_index=True).drop_duplicates("image_id", keep="last")


def run_shards(
    task: Any, shards: list[list[str]], store: Storage, arguments: Callable[[list[str]], dict[str, Any]]
) -> tuple[list[dict[str, Any]], list[list[str]]]:
    """Submit ``task(**arguments(ids))`` for every shard; returns the results and the
    shards that really ran (not served from Prefect's cache, not reused from storage)."""
    task = with_retry_policy(task, get_settings().runtime)
    futures = [task.submit(**arguments(ids)) for ids in shards]
    wait_with_progress(futures, [len(ids) for ids in shards], getattr(task, "name", "shards"))
    results = [f.result() for f in futures]
    for i, ids in enumerate(shards):
        if results[i].get("incomplete") and futures[i].state.name == "Cached":
            log.warning("shard %d: cached result %s had %s missing input(s); recomputing", i, results[i]["key"],
                        results[i]["incomplete"])
            futures[i] = task.with_options(refresh_cache=True).submit(**arguments(ids))
            results[i] = futures[i].result()
        elif not store.exists(results[i]["key"]):
            log.warning("shard %d: cached result %s is missing from storage; recomputing", i, results[i]["key"])
            futures[i] = task.with_options(refresh_cache=True).submit(**arguments(ids))
            results[i] = futures[i].result()
    fresh = [
        ids
        for ids, f, r in zip(shards, futures, results, strict=True)
        if f.state.name != "Cached" and not r.get("reused")
    ]
    return results, fresh


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def wait_with_progress(futures: list[Any], sizes: list[int], what: str) -> None:
    """Wait for shard futures, logging one line per finished shard with the images per
    second so far and the time left (a long stage shows it is moving)."""
    if len(futures) <= 1:
        return
    from prefect.futures import as_completed

    logger = _logger()
    size_of = {id(f): n for f, n in zip(futures, sizes, strict=True)}
    total, done, start = sum(sizes), 0, time.monotonic()
    for i, future in enumerate(as_completed(futures), 1):
        done += size_of[id(future)]
        elapsed = max(time.monotonic() - start, 1e-6)
        rate = done / elapsed
        eta = (total - done) / rate if rate > 0 else 0.0
        logger.info("%s: shard %d/%d done, %d/%d images, %.1f img/s, %s left",
                    what, i, len(futures), done, total, rate, _duration(eta))


def _logger() -> Any:
    try:
        from prefect import get_run_logger

        return get_run_logger()
    except Exception:  # noqa: BLE001 - outside a flow run
        return log


#: concurrency limit name → does it exist on the Prefect API (checked once per process)
_LIMITS: dict[tuple[str, str], bool | None] = {}


def limit_exists(name: str) -> bool | None:
    """Whether the global concurrency limit ``name`` exists (None: the API did not say).
    Asked once per process and API: a missing limit is logged once, not per shard."""
    try:
        from prefect.settings import PREFECT_API_URL

        api = str(PREFECT_API_URL.value() or "ephemeral")
    except Exception:  # noqa: BLE001
        api = "?"
    key = (api, name)
    if key in _LIMITS:
        return _LIMITS[key]
    exists: bool | None
    try:
        from prefect.client.orchestration import get_client
        from prefect.exceptions import ObjectNotFound

        try:
            with get_client(sync_client=True) as client:
                client.read_global_concurrency_limit_by_name(name)
            exists = True
        except ObjectNotFound:
            exists = False
            log.warning("Prefect has no global concurrency limit %r: the model stages run without a slot "
                        "(to share a GPU between runs: `prefect gcl create %s --limit 1`)", name, name)
    except Exception as exc:  # noqa: BLE001 - no API: run without the slot
        log.warning("concurrency limit %r not checked (%s); running without it", name, exc)
        exists = None
    _LIMITS[key] = exists
    return exists


@contextmanager
def gpu_slot(name: str = "gpu") -> Iterator[None]:
    """Hold one slot of the Prefect global concurrency limit ``name`` around the body
    (the model stages' inference and training). A missing limit is logged once per
    process (:func:`limit_exists`) and the body runs without a slot; an unreachable
    Prefect API never fails the run; an empty ``name`` takes no slot."""
    with ExitStack() as stack:
        if name and limit_exists(name):
            try:
                from prefect.concurrency.sync import concurrency

                stack.enter_context(concurrency(name, occupy=1, strict=False))
            except Exception as exc:  # noqa: BLE001 - run without the slot rather than fail
                log.warning("concurrency limit %r not taken (%s); running without it", name, exc)
        yield
