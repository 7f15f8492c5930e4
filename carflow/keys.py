"""Every storage key carflow writes, in one place (DESIGN.md: "Storage keys live in one
module. No other module types a key by hand").

Keys are POSIX-style paths relative to a storage root (a folder or an ``s3://bucket/prefix``).

| key | content |
|---|---|
| ``raw/<id[:2]>/<id>`` | original bytes (and re-encoded images, crops), ``id`` = sha256 |
| ``listings/<site>/<crawl_id>/part-NNNNN.jsonl`` | listing records, one per line |
| ``crawls/<site>/<crawl_id>/stats.json`` | a crawl's Scrapy stats |
| ``manifests/<stage>/<name>.parquet`` | the manifest after a stage (and its side tables) |
| ``work/<stage>/<content key>.parquet`` (+ ``.stats.json``) | one shard's per-image results |
| ``<registry prefix of kind>/<version>/...`` + ``/latest.json`` | versioned artifacts (:mod:`carflow.registry`) |
| ``models/classifier/<version>/eval/<dataset version>/...`` | one evaluation of a classifier (:func:`eval_name`) |
| ``datasets/assignments.parquet`` | listing → split, stable across versions |
| ``datasets/exports/<family>/shards/<content key>.tfrecord`` (+ ``.parquet``) | an immutable export shard and its member rows |
| ``datasets/exports/<family>/latest.json`` | the family's last index (what the next incremental export starts from) |
| ``datasets/<version>/export.json`` | a dataset version's export index: shards per split, label map, excluded rows |
| ``labelling/<name>/`` | labelling kits |
| ``demo/bootstrap/<name>`` | the demo's pointers from a training recipe to its model version |
| ``locks/<name>.json`` | a storage lock: who holds it, since when, lease expiry (:mod:`carflow.lock`) |
| ``runs/<run>/summary.md`` (+ ``summary.json``) | a nightly or demo run's summary: the funnel, per-stage drops, links |
"""

from __future__ import annotations

import re

IMAGE_PREFIX = "raw"
LISTINGS_PREFIX = "listings"
CRAWLS_PREFIX = "crawls"
MANIFESTS_PREFIX = "manifests"
WORK_PREFIX = "work"

#: where each registered kind lives: ``<prefix>/<version>/`` + ``<prefix>/latest.json``
REGISTRY_PREFIXES: dict[str, str] = {
    "car_filter": "models/car_filter",
    "detector": "models/detector",
    "classifier": "models/classifier",
    "dataset": "datasets",
}
POINTER_NAME = "latest.json"
META_NAME = "meta.json"


def image_key(image_id: str, prefix: str = IMAGE_PREFIX) -> str:
    """``raw/<id[:2]>/<id>``: the content-addressed home of an image's bytes."""
    if len(image_id) != 64 or any(c not in "0123456789abcdef" for c in image_id):
        raise ValueError(f"not a sha256 hex image_id: {image_id!r}")
    return f"{prefix}/{image_id[:2]}/{image_id}"


def image_keys(image_ids, prefix: str = IMAGE_PREFIX):
    """:func:`image_key` over an Arrow array of ids, vectorised (the reduce steps)."""
    import pyarrow.compute as pc

    return pc.binary_join_element_wise(prefix, pc.utf8_slice_codeunits(image_ids, 0, 2), image_ids, "/")


def listings_prefix(site: str | None = None, crawl_id: str | None = None) -> str:
    """``listings/``, ``listings/<site>/`` or ``listings/<site>/<crawl_id>/``."""
    if not site:
        return f"{LISTINGS_PREFIX}/"
    return f"{LISTINGS_PREFIX}/{site}/{crawl_id}/" if crawl_id else f"{LISTINGS_PREFIX}/{site}/"


def feed_part_key(site: str, crawl_id: str, part: int) -> str:
    """``listings/<site>/<crawl_id>/part-NNNNN.jsonl``"""
    return f"{listings_prefix(site, crawl_id)}part-{part:05d}.jsonl"


def crawl_stats_key(site: str, crawl_id: str) -> str:
    """``crawls/<site>/<crawl_id>/stats.json``"""
    return f"{CRAWLS_PREFIX}/{site}/{crawl_id}/stats.json"


def manifest_key(stage: str, name: str = "manifest", prefix: str = MANIFESTS_PREFIX) -> str:
    """``manifests/<stage>/<name>.parquet``"""
    return f"{prefix.rstrip('/')}/{stage}/{name}.parquet"


def manifest_side_key(stage: str, name: str, prefix: str = MANIFESTS_PREFIX) -> str:
    """A file beside a stage's manifest: ``manifests/<stage>/<name>`` (contact sheets, charts)."""
    return f"{prefix.rstrip('/')}/{stage}/{name}"


def shard_key(stage: str, content_key: str) -> str:
    """``work/<stage>/<content key>.parquet``: one shard's per-image results."""
    return f"{WORK_PREFIX}/{stage}/{content_key}.parquet"


def shard_stats_key(stage: str, content_key: str) -> str:
    """``work/<stage>/<content key>.stats.json``: the shard's counts and timings."""
    return f"{WORK_PREFIX}/{stage}/{content_key}.stats.json"


def shard_partial_key(stage: str, content_key: str) -> str:
    """``work/<stage>/<content key>.partial.parquet``: the rows of a shard that had a
    missing input; never taken as the done shard, so the next run computes it again."""
    return f"{WORK_PREFIX}/{stage}/{content_key}.partial.parquet"


def registry_prefix(kind: str) -> str:
    try:
        return REGISTRY_PREFIXES[kind]
    except KeyError:
        raise ValueError(f"unknown registry kind {kind!r} (one of {', '.join(REGISTRY_PREFIXES)})") from None


def version_key(kind: str, version: str, name: str = "") -> str:
    """``<kind prefix>/<version>/<name>``"""
    base = f"{registry_prefix(kind)}/{version}"
    return f"{base}/{name}" if name else base


def pointer_key(kind: str, name: str = "latest") -> str:
    """``<kind prefix>/latest.json`` (or another named pointer)."""
    return f"{registry_prefix(kind)}/{name}.json"


#: the folder inside a model version that holds its evaluations
EVAL_DIR = "eval"


def eval_name(dataset_version: str, name: str = "") -> str:
    """``eval/<dataset version>/<name>``, relative to a model version (``Version.key``):
    one evaluation's files (metrics.json, report.md, PNGs, merge_map.yaml, label_issues.csv)."""
    base = f"{EVAL_DIR}/{dataset_version}"
    return f"{base}/{name}" if name else base


def confused_gallery_name(rank: int, true: str, predicted: str) -> str:
    """``confused/<rank>-<true>--as--<predicted>.png``, relative to one evaluation's folder
    (:func:`eval_name`): the gallery of a most-confused pair (labels made path-safe)."""
    def safe(label: str) -> str:
        return re.sub(r"[^A-Za-z0-9_.-]+", "-", label).strip("-") or "x"

    return f"confused/{rank:02d}-{safe(true)}--as--{safe(predicted)}.png"


def contact_sheet_key(stage: str, reason: str, prefix: str = MANIFESTS_PREFIX) -> str:
    """``manifests/<stage>/contact_sheets/<reason>.png``: a stage's dropped photos for one reason."""
    return manifest_side_key(stage, f"contact_sheets/{reason}.png", prefix=prefix)


def assignments_key() -> str:
    """``datasets/assignments.parquet``: listing → split, never moved once assigned."""
    return f"{registry_prefix('dataset')}/assignments.parquet"


def labelling_prefix(name: str) -> str:
    """``labelling/<name>``"""
    return f"labelling/{name}"


def labelling_thumb(image_id: str) -> str:
    """``thumbs/<image_id>.jpg``: a labelling kit's thumbnail, relative to the kit (as
    its ``labels.csv`` names it; the key is :func:`labelling_kit_key` of it)."""
    return f"thumbs/{image_id}.jpg"


def labelling_kit_key(kit: str, name: str) -> str:
    """``<kit>/<name>``: a file of the labelling kit under the prefix ``kit``
    (``labels.csv``, ``contact_sheet-NNN.png``, :func:`labelling_thumb`)."""
    return f"{kit.rstrip('/')}/{name}"


EXPORTS_DIR = "exports"


def export_family(size: int, fit: str, quality: int, fmt: str = "tfrecord") -> str:
    """``tfrecord-<size>-<fit>-q<quality>``: exports whose shards can be shared."""
    return f"{fmt}-{int(size)}-{fit}-q{int(quality)}"


def export_prefix(family: str) -> str:
    """``datasets/exports/<family>``"""
    return f"{registry_prefix('dataset')}/{EXPORTS_DIR}/{family}"


def export_shard_key(family: str, content_key: str, ext: str = "tfrecord") -> str:
    """``datasets/exports/<family>/shards/<content key>.<ext>`` (``tfrecord``: the
    records; ``parquet``: the shard's member rows, written after the records)."""
    return f"{export_prefix(family)}/shards/{content_key}.{ext}"


def export_family_pointer_key(family: str) -> str:
    """``datasets/exports/<family>/latest.json``: the index the next export starts from."""
    return f"{export_prefix(family)}/{POINTER_NAME}"


def export_index_key(version: str) -> str:
    """``datasets/<version>/export.json``: a dataset version's export index (written last)."""
    return version_key("dataset", version, "export.json")


def bootstrap_key(name: str) -> str:
    """``demo/bootstrap/<name>``: the demo's bookkeeping (which model a recipe trained)."""
    return f"demo/bootstrap/{name}"


TRAIN_PREFIX = "work/train"


def train_run_key(run_key: str, name: str = "", prefix: str = TRAIN_PREFIX) -> str:
    """``work/train/<run key>/<name>``: one training run's resumable state
    (``state.json``, ``checkpoint-<epoch>.keras``) and its ``tensorboard/`` logs; the run
    key covers the dataset export, the recipe and the fold, so rerunning the same command
    finds its checkpoint."""
    base = f"{prefix.rstrip('/')}/{run_key}"
    return f"{base}/{name}" if name else base


LOCKS_PREFIX = "locks"


def lock_key(name: str = "pipeline") -> str:
    """``locks/<name>.json``: a storage lock (:mod:`carflow.lock`): the owner, since when,
    and when its lease expires. ``pipeline`` is the nightly's."""
    if not name or "/" in name:
        raise ValueError(f"invalid lock name: {name!r}")
    return f"{LOCKS_PREFIX}/{name}.json"


RUNS_PREFIX = "runs"


def run_summary_key(run: str, name: str = "summary.md") -> str:
    """``runs/<run>/<name>``: a nightly (or demo) run's summary (``summary.md``, ``summary.json``)."""
    return f"{RUNS_PREFIX}/{run}/{name}"
