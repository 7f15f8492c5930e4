"""Crop stage: the largest vehicle box of each image, padded, stored as a new JPEG.

The box logic (``largest_box``, ``pad_box``, ``crop_decision``) lives in
:mod:`models.crop`, shared with serving; here are the batched shard pass
(:func:`crop_shard_to_storage`, under the shard contract of :mod:`tasks.shards`) and its
Prefect task.

Batching: images are decoded in threads, letterboxed there (rectangular, ultralytics'
``LetterBox``), bucketed by letterbox shape and streamed, a bounded number of images
ahead, as batches of up to ``crop.batch_size`` (auto: 8 on a CPU, 64 on a GPU) equal-shape arrays; each batch is ONE
forward pass of :class:`models.detector.DetectorNet` (the model's network called
directly: every CPU core, fp16/bf16 autocast where the hardware has it, ultralytics'
NMS and box scaling). A list of paths is never handed to ultralytics (it would open them
all eagerly and ignore ``batch=``), and neither is a list of arrays (its predictor pins
torch to ``cpu_count - 1`` threads and squares mixed-size batches). A file that does not
decode becomes a row with reason ``decode_error`` and never reaches the model, so it
cannot fail its batch.

COCO ``car`` (2) and ``truck`` (7) are merged into one output class, ``vehicle``, as the
seed scripts did; the box with the largest area wins.

Output rows (one per unique image): ``image_id, status, reason, bbox`` (padded crop box
``[x0, y0, x1, y1]`` ints, x1/y1 exclusive), ``det_class, det_conf, crop_id`` (the crop,
content-addressed via ``storage.put_image``), ``crop_width, crop_height``.
"""

from __future__ import annotations

import functools
import io
import itertools
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
from prefect import task
from prefect.cache_policies import NO_CACHE

from carflow import imageio
from carflow.keys import manifest_key
from carflow.manifest import (
    CLEAN_SCHEMA,
    CROP_MANIFEST_SCHEMA,
    DROPPED,
    KEPT,
    InputError,
    read_input,
    write_manifest,
)
from carflow.settings import CropSettings
from carflow.storage import Storage, open_storage
from models.crop import VEHICLE, crop_decision, largest_box, pad_box  # noqa: F401 - re-exported
from tasks.retry import RETRY
from tasks.shards import (
    ShardSpec,
    gpu_slot,
    load_shard_results,
    merge_results,
    run_shard,
    status_counts,
)

STAGE = "crop"
#: bump when the crop logic changes results
VERSION = "1"
#: decompression-bomb guard for the full decode
MAX_PIXELS = imageio.DECODE_MAX_PIXELS

CROP_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("status", pa.string(), nullable=False),
        pa.field("reason", pa.string()),
        pa.field("bbox", pa.list_(pa.int64())),
        pa.field("det_class", pa.string()),
        pa.field("det_conf", pa.float64()),
        pa.field("crop_id", pa.string()),
        pa.field("crop_width", pa.int64()),
        pa.field("crop_height", pa.int64()),
    ]
)


#: the columns the crop stage adds to its input manifest (``CROP_MANIFEST_SCHEMA``)
CROP_COLUMNS = ["bbox", "det_class", "det_conf", "crop_id"]


# -- pure functions (one home: models/crop.py, shared with serving) ----------------------
def decode_rgb(data: bytes) -> np.ndarray:
    """Bytes → upright RGB ``uint8`` array: :func:`carflow.imageio.decode_rgb` (bombs
    refused above :data:`MAX_PIXELS`), the decode serving runs on the same stored bytes."""
    return imageio.decode_rgb(data, MAX_PIXELS)


def encode_jpeg(arr: np.ndarray, quality: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


# -- batching ---------------------------------------------------------------------------
class Decoded(NamedTuple):
    image_id: str
    array: np.ndarray | None  # upright RGB, full size
    letterboxed: np.ndarray | None  # the detector's input for it
    error: str | None


def stream_batches(
    image_ids: Sequence[str],
    load: Callable[[str], bytes],
    batch_size: int,
    pool: ThreadPoolExecutor,
    prepare: Callable[[np.ndarray], np.ndarray] | None = None,
    prefetch: int = 2,
    max_buffered: int | None = None,
    overlap: bool = True,
) -> Iterator[tuple[list[Decoded], list[Decoded]]]:
    """Decode (and ``prepare``, e.g. letterbox) in ``pool`` threads, at most
    ``(prefetch + 1) * batch_size`` images ahead, and yield ``(good, bad)``.

    ``overlap=False`` (inference on the CPU): nothing is decoded while the consumer holds a
    batch; the next ``batch_size`` images are decoded, in parallel, only when it asks for
    more. Decoding and the forward pass then take turns on all cores instead of fighting
    over them (an OpenMP forward with one core taken by a decoder thread stalls at every
    barrier: measured 2-5x slower on 2 cores).

    ``good`` is a batch of up to ``batch_size`` decoded images that share one prepared
    shape (images are bucketed by it, so a batch is one rectangular forward pass, as
    ultralytics' val ``rect`` mode does); ``bad`` holds the images that failed to load or
    decode since the previous yield. A bucket is yielded when full; when more than
    ``max_buffered`` images wait in partial buckets (many distinct shapes) the fullest is
    yielded early, so memory stays bounded. Input order is kept within each list."""
    prepare = prepare or (lambda a: a)
    max_buffered = max_buffered if max_buffered is not None else 4 * batch_size

    def work(image_id: str) -> Decoded:
        try:
            data = load(image_id)
        except KeyError:
            return Decoded(image_id, None, None, "missing")
        try:
            arr = decode_rgb(data)
            return Decoded(image_id, arr, prepare(arr), None)
        except Exception as exc:  # noqa: BLE001 - bad input is data, never an exception
            return Decoded(image_id, None, None, f"{type(exc).__name__}: {exc}"[:200])

    def decoded() -> Iterator[Decoded]:
        it = iter(image_ids)
        if not overlap:
            while chunk := list(itertools.islice(it, batch_size)):
                yield from [f.result() for f in [pool.submit(work, i) for i in chunk]]
            return
        pending: deque[Future[Decoded]] = deque()
        ahead = batch_size * (prefetch + 1)
        for image_id in it:
            pending.append(pool.submit(work, image_id))
            if len(pending) >= ahead:
                break
        while pending:
            item = pending.popleft().result()
            nxt = next(it, None)
            if nxt is not None:
                pending.append(pool.submit(work, nxt))
            yield item

    buckets: dict[tuple[int, ...], list[Decoded]] = {}
    bad: list[Decoded] = []
    buffered = 0
    for item in decoded():
        if item.array is None:
            bad.append(item)
            continue
        bucket = buckets.setdefault(item.letterboxed.shape, [])
        bucket.append(item)
        buffered += 1
        if len(bucket) == batch_size or buffered > max_buffered:
            shape = item.letterboxed.shape if len(bucket) == batch_size else max(buckets, key=lambda k: len(buckets[k]))
            batch = buckets.pop(shape)
            buffered -= len(batch)
            yield batch, bad
            bad = []
    for batch in buckets.values():
        yield batch, bad
        bad = []
    if bad:
        yield [], bad


def predict_batch(model: Any, arrays: list[np.ndarray], cfg: CropSettings) -> list[tuple[Any, Any, Any]]:
    """One batched forward pass over ``arrays`` (RGB, any sizes): :meth:`models.crop.CropPredictor.detect`.
    Returns per image (xyxy, cls, conf) in the image's pixels."""
    from models.crop import CropPredictor

    return CropPredictor(_net(model, cfg), cfg).detect(arrays)


def batch_size(cfg: CropSettings, net: Any) -> int:
    """``crop.batch_size``, or for 0 (auto): 64 on a GPU, 8 on a CPU."""
    if cfg.batch_size:
        return cfg.batch_size
    return 8 if getattr(net, "device", "cpu").startswith("cpu") else 64


def _net(model: Any, cfg: CropSettings):
    from models.detector import detector_net

    if callable(getattr(model, "detect", None)) and callable(getattr(model, "letterbox", None)):
        return model  # a DetectorNet already (or anything with its interface)
    return detector_net(model, cfg.device, cfg.precision, cfg.torch_threads)


def crop_images(
    storage: Storage,
    image_ids: Sequence[str],
    model: Any,
    cfg: CropSettings,
    slot: Callable[[], AbstractContextManager[Any]] = nullcontext,
    stats: Counter[str] | None = None,
) -> list[dict[str, Any]]:
    """Detect, decide and store crops for ``image_ids``; one row per id, in input order.
    ``model`` is an ultralytics YOLO (or a :class:`models.detector.DetectorNet`)."""
    stats = stats if stats is not None else Counter()
    net = _net(model, cfg)
    rows: list[dict[str, Any]] = []

    def finish(image_id: str, arr: np.ndarray, det_row: dict[str, Any]) -> dict[str, Any]:
        row = {"image_id": image_id, **det_row, "crop_id": None, "crop_width": None, "crop_height": None}
        if row["status"] == KEPT:
            x0, y0, x1, y1 = row["bbox"]
            crop = arr[y0:y1, x0:x1]
            row["crop_id"] = storage.put_image(encode_jpeg(crop, cfg.jpeg_quality))
            row["crop_width"], row["crop_height"] = int(crop.shape[1]), int(crop.shape[0])
        return row

    def prepare(arr: np.ndarray) -> np.ndarray:
        return net.letterbox(arr, cfg.imgsz, rect=True)

    # on the CPU, decoding/encoding and the forward pass take turns (see stream_batches)
    overlap = not getattr(net, "device", "cpu").startswith("cpu")
    by_id: dict[str, Future[dict[str, Any]] | dict[str, Any]] = {}
    finishing: list[Future[dict[str, Any]]] = []
    with ThreadPoolExecutor(max_workers=cfg.decode_workers) as pool:
        with slot():
            for good, bad in stream_batches(image_ids, storage.get_image, batch_size(cfg, net), pool, prepare,
                                            overlap=overlap):
                for item in bad:
                    by_id[item.image_id] = {"image_id": item.image_id, "status": DROPPED,
                                            "reason": "missing" if item.error == "missing" else "decode_error",
                                            "bbox": None, "det_class": None, "det_conf": None, "crop_id": None,
                                            "crop_width": None, "crop_height": None}
                if not good:
                    continue
                if not overlap:  # the previous batch's crops are encoded before this forward
                    for f in finishing:
                        f.result()
                    finishing.clear()
                preds = net.detect([d.letterboxed for d in good], [d.array.shape[:2] for d in good],
                                   cfg.conf, list(cfg.keep_classes))
                stats["batches"] += 1
                stats["inferred"] += len(good)
                for d, (xyxy, cls, conf) in zip(good, preds, strict=True):
                    det = largest_box(xyxy, cls, conf, cfg.keep_classes, cfg.conf)
                    decision = crop_decision(det, d.array.shape[1], d.array.shape[0], cfg)
                    by_id[d.image_id] = pool.submit(finish, d.image_id, d.array, decision)  # encode + store in a thread
                    finishing.append(by_id[d.image_id])
        for image_id in image_ids:
            done = by_id[image_id]
            rows.append(done.result() if isinstance(done, Future) else done)
    for row in rows:
        stats[f"{row['status']}:{row['reason'] or ''}".rstrip(":")] += 1
    return rows


# -- shard task -------------------------------------------------------------------------
def crop_config(cfg: CropSettings) -> dict[str, Any]:
    """The config a shard is keyed on and run with: crop settings + what identifies the
    weights (decode_workers and gpu_limit do not change results and are left out).
    ``imgsz`` / ``conf`` / ``keep_classes`` are the ones stored with a registered detector
    version (:func:`models.crop.detector_settings`) unless ``cfg`` sets them explicitly:
    serving reads the same ones from the version it loads."""
    from models.crop import detector_settings, weights_meta
    from models.detector import resolve_device, resolve_precision, weights_version

    cfg = detector_settings(cfg, weights_meta(cfg.weights))
    data = cfg.model_dump(mode="json")
    data.pop("decode_workers", None)
    data.pop("gpu_limit", None)
    data.pop("torch_threads", None)
    data.pop("enabled", None)
    data["weights_version"] = weights_version(cfg.weights)
    # what inference really runs in (auto → fp16 / bf16 / fp32 for this machine)
    data["precision"] = resolve_precision(cfg.precision, resolve_device(cfg.device))
    return data


def crop_spec(config: dict[str, Any]) -> ShardSpec:
    """The crop shards' :class:`~tasks.shards.ShardSpec`: keyed on :func:`crop_config`."""
    return ShardSpec(STAGE, VERSION, config)


def crop_shard_to_storage(
    storage: Storage,
    image_ids: list[str],
    cfg: CropSettings,
    model: Any = None,
    slot: Callable[[], AbstractContextManager[Any]] = nullcontext,
    config: dict[str, Any] | None = None,
    refresh: bool = False,
) -> dict[str, Any]:
    """Crop one shard under the shard contract (:func:`tasks.shards.run_shard`): rows
    under ``work/crop/<content key>.parquet`` plus its ``.stats.json``; a shard whose
    output is already stored loads no model and runs no inference (unless ``refresh``). Returns
    ``{"key", "stats", "reused"}``."""
    config = config if config is not None else crop_config(cfg)

    def compute(ids: list[str]) -> tuple[pa.Table, dict[str, Any]]:
        net = model
        if net is None:
            from models.detector import load_detector

            net = load_detector(cfg.weights)
        stats: Counter[str] = Counter()
        rows = crop_images(storage, ids, net, cfg, slot=slot, stats=stats)
        return pa.Table.from_pylist(rows, schema=CROP_SCHEMA), dict(sorted(stats.items()))

    return run_shard(storage, crop_spec(config), image_ids, compute, refresh=refresh)


def merge_crops(manifest: pa.Table, results: pa.Table) -> pa.Table:
    """Per-image crop rows → manifest rows (by ``image_id``), :data:`CROP_COLUMNS` added.
    Rows dropped before this stage keep their status and reason (and get no crop); a
    kept row without a result is ``not_cropped``."""
    return merge_results(manifest, results, CROP_COLUMNS, "not_cropped")


@task(name="crop-merge", cache_policy=NO_CACHE, retries=1)
def merge_crops_task(storage_uri: str | None, source_key: str, source_hash: str, shard_keys: list[str],
                     prefix: str = "manifests") -> dict[str, Any]:
    """Read the input manifest (the one the flow planned from: ``source_hash``) and the
    crop shards, write ``manifests/crop/manifest.parquet`` with its lineage; returns
    counts (no rows pass through Prefect)."""
    store = open_storage(storage_uri)
    source = read_input(store, source_key, CLEAN_SCHEMA, check=False)
    if source.hash != source_hash:
        raise InputError(f"{store.uri(source_key)} changed while the crop stage ran: run `carflow crop` again")
    results = load_shard_results(store, shard_keys, ["image_id", "status", "reason", *CROP_COLUMNS], CROP_SCHEMA)
    table = merge_crops(source.table, results)
    uri = write_manifest(store, manifest_key(STAGE, prefix=prefix), table, CROP_MANIFEST_SCHEMA,
                         lineage=source.lineage())
    return {"manifest": uri, **status_counts(table), "crops": table.num_rows - table["crop_id"].null_count}


@task(name="crop-shard", cache_policy=NO_CACHE, **RETRY.io())
def crop_shard_task(
    storage_uri: str | None,
    image_ids: list[str],
    config: dict[str, Any],
    gpu_limit: str = "gpu",
    decode_workers: int = 4,
    refresh: bool = False,
) -> dict[str, Any]:
    """Keyed on (stage, version, sorted image ids, crop config incl. weights version): a
    shard whose output is in storage loads no model and runs no inference, whatever
    Prefect's local state holds (unless ``refresh``). ``gpu_limit`` and ``decode_workers``
    do not change results and are not part of the key."""
    fields = set(CropSettings.model_fields)
    cfg = CropSettings(**{k: v for k, v in config.items() if k in fields}, decode_workers=decode_workers)
    return crop_shard_to_storage(
        open_storage(storage_uri), image_ids, cfg, slot=functools.partial(gpu_slot, gpu_limit), config=config,
        refresh=refresh,
    )
