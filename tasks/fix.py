"""Fix stage: the clean stage's per-image pass over a shard, from ONE decode.

The fixer's decision itself (drop reasons, fixes, the one small decode) is
:func:`carflow.fixer.fix_image`, in the core so that serving runs the very same checks;
see :mod:`carflow.fixer` for the reasons and actions. Here:

- :func:`inspect_image` = :func:`fix_image` + quality scores (``tasks.quality``) +
  perceptual/pixel hashes (``carflow.imagehash``), all from the one small decode that
  the fixer made. Its dict holds the manifest columns of the clean stage.
- :func:`inspect_shard` runs :func:`inspect_image` over ``(image_id, bytes)`` pairs.
- :func:`inspect_schema`, :func:`shard_stats`: the shard's Arrow schema and counters.
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from carflow.fixer import MISSING, REASONS, VERSION, DecodeBudget, FixResult, fix_image
from carflow.imagehash import colour_thumb, dhash64, phash64, pixel_sha256, to_int64
from carflow.manifest import DROPPED, KEPT
from carflow.settings import FixSettings, QualitySettings, as_settings
from tasks.quality import apply_quality, quality_scores

STAGE = "fix"


# ---------------------------------------------------------------------------------------
# the single pass: fix + quality + hashes
# ---------------------------------------------------------------------------------------
#: columns of :func:`inspect_image`'s dict (besides ``image_id`` from :func:`inspect_shard`)
SCORE_COLUMNS = (
    "aspect_ratio",
    "sqrt_area",
    "dark_score",
    "light_score",
    "entropy",
    "low_information_score",
    "blurriness",
    "blurry_score",
    "grayscale_score",
    "colorfulness",
)
COLUMNS = (
    "status",
    "reason",
    "error",
    "fix_actions",
    "src_format",
    "src_mode",
    "width",
    "height",
    "decoded_fraction",
    "jpeg_scans",
    "out_bytes",
    "out_image_id",
    *SCORE_COLUMNS,
    "quality_flags",
    "phash",
    "dhash",
    "pixel_hash",
    "thumb",
)


def inspect_schema(with_out_bytes: bool = True):
    """The Arrow schema of :func:`inspect_shard`'s rows (``image_id`` first), so a shard
    whose lists are all empty or whose scores are all null still gets typed columns:
    ``pa.Table.from_pylist(rows, schema=inspect_schema())``."""
    import pyarrow as pa

    types = {
        "image_id": pa.string(),
        "status": pa.string(),
        "reason": pa.string(),
        "error": pa.string(),
        "fix_actions": pa.list_(pa.string()),
        "src_format": pa.string(),
        "src_mode": pa.string(),
        "width": pa.int64(),
        "height": pa.int64(),
        "decoded_fraction": pa.float64(),
        "jpeg_scans": pa.int64(),
        "out_bytes": pa.binary(),
        "out_image_id": pa.string(),
        **{c: pa.float64() for c in SCORE_COLUMNS},
        "grayscale_score": pa.int64(),
        "quality_flags": pa.list_(pa.string()),
        "phash": pa.int64(),
        "dhash": pa.int64(),
        "pixel_hash": pa.string(),
        "thumb": pa.binary(),
    }
    names = ["image_id", *COLUMNS]
    if not with_out_bytes:
        names.remove("out_bytes")
    return pa.schema([pa.field(n, types[n]) for n in names])


def inspect_image(
    data: bytes | None,
    fix_cfg: FixSettings | None = None,
    quality_cfg: QualitySettings | None = None,
    budget: DecodeBudget | None = None,
) -> dict[str, Any]:
    """One decode → the clean stage's columns for one image (``data=None``: the
    original is missing from storage, reason ``missing``).

    ``phash``/``dhash`` are stored as **signed int64** (the 64 hash bits reinterpreted;
    XOR/popcount distances are unchanged; :func:`to_int64`). ``pixel_hash`` is
    ``pixel_sha256`` of the small decode (equal for files whose coded pixels are
    identical but whose bytes differ, e.g. metadata-only edits). A quality check with
    action ``drop`` sets ``status='dropped'`` and ``reason`` to the check name; hashes
    and scores are still filled in for such rows. ``thumb`` (8×8 RGB, 192 bytes) lets
    dedup confirm a near pair on colour and layout. Never raises on bad input (an invalid
    config does raise)."""
    fix_cfg = as_settings(FixSettings, fix_cfg)
    quality_cfg = as_settings(QualitySettings, quality_cfg)
    row: dict[str, Any] = dict.fromkeys(COLUMNS)
    if data is None:  # the original is not in storage: not an empty file
        row.update(status=DROPPED, reason=MISSING, error="original not found in storage", fix_actions=[],
                   quality_flags=[])
        return row
    res = fix_image(data, fix_cfg, budget)
    row.update(
        status=res.status,
        reason=res.reason,
        error=res.error,
        fix_actions=list(res.actions),
        src_format=res.src_format,
        src_mode=res.src_mode,
        width=res.width,
        height=res.height,
        decoded_fraction=res.decoded_fraction,
        jpeg_scans=res.jpeg_scans,
        out_bytes=res.out_bytes,
        out_image_id=hashlib.sha256(res.out_bytes).hexdigest()
        if res.out_bytes is not None
        else None,
        quality_flags=[],
    )
    if res.status != KEPT or res.small is None:
        return row
    try:
        scores = quality_scores(
            res.small, res.width, res.height, src_mode=res.src_mode, cfg=quality_cfg
        )
        for key in SCORE_COLUMNS:
            row[key] = scores[key]
        flags, drop = apply_quality(scores, quality_cfg)
        row["quality_flags"] = flags
        row["phash"] = to_int64(phash64(res.gray32))
        row["dhash"] = to_int64(dhash64(res.gray9x8))
        row["pixel_hash"] = pixel_sha256(res.small)
        row["thumb"] = colour_thumb(res.small)
    except Exception as exc:  # noqa: BLE001
        row.update(
            status=DROPPED,
            reason="decode_error",
            error=f"{type(exc).__name__}: {exc}"[:500],
            out_bytes=None,
            out_image_id=None,
        )
        return row
    if drop is not None:
        row.update(status=DROPPED, reason=drop, out_bytes=None, out_image_id=None)
    return row


def inspect_shard(
    items: Iterable[tuple[str, bytes | None]],
    fix_cfg: FixSettings | None = None,
    quality_cfg: QualitySettings | None = None,
    *,
    workers: int = 1,
    put_image: Callable[[bytes], str] | None = None,
    budget: DecodeBudget | None = None,
) -> list[dict[str, Any]]:
    """:func:`inspect_image` over ``(image_id, bytes)`` pairs → one dict per item, in
    input order, each starting with ``image_id``.

    ``workers > 1`` uses a thread pool: Pillow releases the GIL while decoding and
    resizing, so on the 2-core dev box 2 threads give ~1.7× one thread (``bench/clean.py``;
    2 shards in 2 processes, as Prefect's process runner or Dask run them, give ~2×). Use
    ``workers=1`` when the engine already runs one shard per core. At most
    ``4 × workers`` images are in flight, so ``items`` may be a lazy generator. With ``put_image`` each
    re-encoded image is handed to it as soon as it is made (it returns the new
    image_id, which must equal ``out_image_id``) and ``out_bytes`` is dropped from the
    row, so a shard's re-encoded bytes are never all held in memory.

    The full decodes in flight share one :class:`DecodeBudget` of
    ``fix.decode_memory_mb`` (or ``budget``): four threads that each meet a 40 Mpx PNG
    take turns instead of holding four decoded copies at once."""
    fix_cfg = as_settings(FixSettings, fix_cfg)
    quality_cfg = as_settings(QualitySettings, quality_cfg)
    if budget is None:
        budget = DecodeBudget(fix_cfg.decode_memory_mb << 20)

    def one(item: tuple[str, bytes]) -> dict[str, Any]:
        image_id, data = item
        row = inspect_image(data, fix_cfg, quality_cfg, budget)
        if put_image is not None and row["out_bytes"] is not None:
            stored = put_image(row["out_bytes"])
            if stored != row["out_image_id"]:
                raise RuntimeError(
                    f"put_image returned {stored!r}, expected {row['out_image_id']!r}"
                )
            row["out_bytes"] = None
        return {"image_id": image_id, **row}

    if workers <= 1:
        return [one(item) for item in items]
    out: list[dict[str, Any]] = []
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="carflow-fix") as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(one, item))
            if len(pending) >= 4 * workers:
                out.append(pending.popleft().result())
        while pending:
            out.append(pending.popleft().result())
    return out


def shard_stats(rows: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Counters for a shard's rows (status, reasons, actions, flags) for the stats file
    and the Prefect artifact."""
    from collections import Counter

    status: Counter = Counter()
    reasons: Counter = Counter()
    actions: Counter = Counter()
    flags: Counter = Counter()
    for r in rows:
        status[r.get("status")] += 1
        if r.get("reason"):
            reasons[r["reason"]] += 1
        actions.update(r.get("fix_actions") or [])
        flags.update(r.get("quality_flags") or [])
    return {
        "images": sum(status.values()),
        "status": dict(status),
        "reasons": dict(sorted(reasons.items())),
        "actions": dict(sorted(actions.items())),
        "quality_flags": dict(sorted(flags.items())),
    }


__all__ = [
    "COLUMNS",
    "VERSION",
    "DecodeBudget",
    "FixResult",
    "FixSettings",
    "MISSING",
    "REASONS",
    "SCORE_COLUMNS",
    "as_settings",
    "fix_image",
    "inspect_image",
    "inspect_schema",
    "inspect_shard",
    "shard_stats",
    "to_int64",
]
