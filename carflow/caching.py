"""Content cache keys for shard tasks (DESIGN.md: "cache keys are content keys").

A shard task is keyed on the stage name, the stage's code/model version, the sorted
``image_id``s of the shard and the stage config — never on a path or a client — so a
rerun with unchanged inputs does no work and 1% new listings redo about 1% of shards.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from typing import Any

from pydantic import BaseModel


def _config_json(config: Any) -> str:
    if config is None:
        return "null"
    if isinstance(config, BaseModel):
        config = config.model_dump(mode="json")
    return json.dumps(config, sort_keys=True, default=str)


def content_key(stage: str, version: str, image_ids: Iterable[str], config: Any = None) -> str:
    """sha256 over stage, version, the sorted unique image ids and the config."""
    h = hashlib.sha256()
    h.update(f"{stage}\0{version}\0".encode())
    for image_id in sorted(set(image_ids)):
        h.update(image_id.encode())
        h.update(b"\n")
    h.update(_config_json(config).encode())
    return f"{stage}-{version}-{h.hexdigest()}"


def shard_cache_key_fn(
    stage: str,
    version: str,
    ids_param: str = "image_ids",
    config_param: str = "config",
    storage_param: str | None = "storage_uri",
) -> Callable[[Any, dict[str, Any]], str]:
    """A Prefect ``cache_key_fn`` for a task whose parameters hold the shard's image ids
    (``ids_param``) and its config (``config_param``).

    The one other thing in the key is the *output* storage (``storage_param``, resolved to
    its absolute URI): a shard task writes its results and re-encoded images there, so the
    same images processed into another bucket must run again, or the cached result would
    point at objects that do not exist in that bucket. Input paths, clients and workers
    are never part of the key."""

    def key(_context: Any, parameters: dict[str, Any]) -> str:
        config: Any = parameters.get(config_param)
        if storage_param is not None:
            from carflow.storage import open_storage

            config = {"config": _config_json(config), "output": open_storage(parameters.get(storage_param)).uri()}
        return content_key(stage, version, parameters[ids_param], config)

    key.__name__ = f"{stage}_cache_key"
    return key


def shards(items: list[Any], size: int) -> list[list[Any]]:
    """Split ``items`` into consecutive shards of at most ``size``."""
    if size < 1:
        raise ValueError("shard size must be >= 1")
    return [items[i : i + size] for i in range(0, len(items), size)]
