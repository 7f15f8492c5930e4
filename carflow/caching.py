"""Content keys for shard outputs (DESIGN.md: "cache keys are content keys").

A shard is keyed on the stage name, the stage's code/model version, the sorted
``image_id``s of the shard and the settings that change its per-image output — never on a
path or a client — so a rerun with unchanged inputs does no work and 1% new listings redo
about 1% of shards. The key names the shard's output in storage
(:class:`tasks.shards.ShardSpec`); the storage is the cache.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
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


def shards(items: list[Any], size: int) -> list[list[Any]]:
    """Split ``items`` into consecutive shards of at most ``size``."""
    if size < 1:
        raise ValueError("shard size must be >= 1")
    return [items[i : i + size] for i in range(0, len(items), size)]
