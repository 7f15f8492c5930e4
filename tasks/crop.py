"""Crop stage: the largest vehicle box of each image, padded, stored as a new JPEG.

Pure functions first (:func:`largest_box`, :func:`pad_box`, :func:`crop_decision`),
then the batched shard pass (:func:`crop_shard_to_storage`) and the cached Prefect task.

Batching: images are decoded in threads into RGB arrays and streamed, a bounded number
of batches ahead, as fixed-size batches of ``crop.batch_size`` arrays; each batch is one
``model.predict(list_of_arrays)`` call. Ultralytics wraps a list of arrays in
``LoadPilAndNumpy`` whose ``bs`` is the list length, so the whole list is letterboxed to
``imgsz``, stacked and run as ONE forward pass (``batch=`` is ignored for lists; that is
why we cut the batches ourselves). A file that does not decode becomes a row with reason
``decode_error`` and never reaches the model, so it cannot fail its batch.

COCO ``car`` (2) and ``truck`` (7) are merged into one output class, ``vehicle``, as the
seed scripts did; the box with the largest area wins.

Output rows (one per unique image): ``image_id, status, reason, bbox`` (padded crop box
``[x0, y0, x1, y1]`` ints, x1/y1 exclusive), ``det_class, det_conf, crop_id`` (the crop,
content-addressed via ``storage.put_image``), ``crop_width, crop_height``.
"""

from __future__ import annotations

import io
import json
import math
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from prefect import task

from carflow.caching import content_key, shard_cache_key_fn
from carflow.manifest import DROPPED, KEPT
from carflow.settings import CropSettings
from carflow.storage import Storage, open_storage

STAGE = "crop"
#: bump when the crop logic changes results
VERSION = "1"
VEHICLE = "vehicle"
#: decompression-bomb guard for the full decode
MAX_PIXELS = 40_000_000

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


# -- pure functions ---------------------------------------------------------------------
def largest_box(
    boxes: Any,
    classes: Any,
    confs: Any,
    keep_classes: Sequence[int] = (2, 7),
    conf: float = 0.25,
) -> dict[str, Any] | None:
    """The largest-area box among detections of ``keep_classes`` with confidence ≥ ``conf``.

    ``boxes`` is ``(N, 4)`` xyxy; kept classes are merged into the one class ``vehicle``.
    Ties on area go to the higher confidence. Returns ``{"box": (x0, y0, x1, y1) floats,
    "det_class": "vehicle", "source_class": int, "det_conf": float}`` or ``None``."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    c = np.asarray(classes).reshape(-1).astype(np.int64)
    p = np.asarray(confs, dtype=np.float64).reshape(-1)
    if not (len(b) == len(c) == len(p)):
        raise ValueError(f"boxes/classes/confs lengths differ: {len(b)}, {len(c)}, {len(p)}")
    ok = np.isin(c, np.asarray(list(keep_classes), dtype=np.int64)) & (p >= conf)
    if not ok.any():
        return None
    idx = np.flatnonzero(ok)
    area = np.clip(b[idx, 2] - b[idx, 0], 0, None) * np.clip(b[idx, 3] - b[idx, 1], 0, None)
    best = idx[np.lexsort((-p[idx], -area))[0]]
    return {
        "box": tuple(float(v) for v in b[best]),
        "det_class": VEHICLE,
        "source_class": int(c[best]),
        "det_conf": float(p[best]),
    }


def pad_box(box: Sequence[float], margin: float, width: int, height: int) -> tuple[int, int, int, int]:
    """Grow ``box`` (x0, y0, x1, y1; x1/y1 exclusive) by ``margin`` × its width on the left
    and right and × its height on top and bottom, round outwards to whole pixels and clip
    to the ``width`` × ``height`` image."""
    x0, y0, x1, y1 = (float(v) for v in box)
    dx, dy = margin * max(x1 - x0, 0.0), margin * max(y1 - y0, 0.0)
    return (
        max(0, min(width, math.floor(x0 - dx))),
        max(0, min(height, math.floor(y0 - dy))),
        max(0, min(width, math.ceil(x1 + dx))),
        max(0, min(height, math.ceil(y1 + dy))),
    )


def crop_decision(det: dict[str, Any] | None, width: int, height: int, cfg: CropSettings) -> dict[str, Any]:
    """A detection (from :func:`largest_box`) → the row's status/reason/bbox/class/conf.
    No vehicle → ``no_vehicle``; a padded crop with a side < ``crop.min_side`` → ``too_small``
    (its bbox is still recorded)."""
    if det is None:
        return {"status": DROPPED, "reason": "no_vehicle", "bbox": None, "det_class": None, "det_conf": None}
    bbox = list(pad_box(det["box"], cfg.margin, width, height))
    row = {"status": KEPT, "reason": None, "bbox": bbox, "det_class": det["det_class"], "det_conf": det["det_conf"]}
    if min(bbox[2] - bbox[0], bbox[3] - bbox[1]) < cfg.min_side:
        row.update(status=DROPPED, reason="too_small")
    return row


def decode_rgb(data: bytes) -> np.ndarray:
    """Bytes → upright RGB ``uint8`` array (EXIF orientation applied; bombs refused)."""
    from PIL import ImageOps

    from carflow.imageio import open_checked

    with open_checked(data, MAX_PIXELS) as im:
        im.load()
        im = ImageOps.exif_transpose(im)
        return np.asarray(im.convert("RGB"))


def encode_jpeg(arr: np.ndarray, quality: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


# -- batching ---------------------------------------------------------------------------
Decoded = tuple[str, "np.ndarray | None", "str | None"]  # (image_id, RGB array, error)


def stream_batches(
    image_ids: Sequence[str],
    load: Callable[[str], bytes],
    batch_size: int,
    pool: ThreadPoolExecutor,
    prefetch: int = 2,
) -> Iterator[tuple[list[Decoded], list[Decoded]]]:
    """Decode in ``pool`` threads (at most ``(prefetch + 1) * batch_size`` images ahead)
    and yield ``(good, bad)``: ``good`` is a full batch of ``batch_size`` decoded images
    (the last one may be shorter), ``bad`` the images that failed to load or decode since
    the previous batch. Input order is kept within each list."""

    def work(image_id: str) -> Decoded:
        try:
            data = load(image_id)
        except KeyError:
            return image_id, None, "missing"
        try:
            return image_id, decode_rgb(data), None
        except Exception as exc:  # noqa: BLE001 - bad input is data, never an exception
            return image_id, None, f"{type(exc).__name__}: {exc}"[:200]

    pending: deque[Future[Decoded]] = deque()
    it = iter(image_ids)
    ahead = batch_size * (prefetch + 1)
    for image_id in it:
        pending.append(pool.submit(work, image_id))
        if len(pending) >= ahead:
            break
    good: list[Decoded] = []
    bad: list[Decoded] = []
    while pending:
        item = pending.popleft().result()
        nxt = next(it, None)
        if nxt is not None:
            pending.append(pool.submit(work, nxt))
        (good if item[1] is not None else bad).append(item)
        if len(good) == batch_size:
            yield good, bad
            good, bad = [], []
    if good or bad:
        yield good, bad


def predict_batch(model: Any, arrays: list[np.ndarray], cfg: CropSettings) -> list[tuple[Any, Any, Any]]:
    """One batched forward pass over ``arrays`` (RGB). Returns per image (xyxy, cls, conf)."""
    lock = getattr(model, "carflow_lock", None) or nullcontext()
    kwargs: dict[str, Any] = {
        "imgsz": cfg.imgsz,
        "conf": cfg.conf,
        "classes": list(cfg.keep_classes),
        "verbose": False,
        "save": False,
        "batch": len(arrays),
    }
    if cfg.device:
        kwargs["device"] = cfg.device
    bgr = [np.ascontiguousarray(a[..., ::-1]) for a in arrays]  # ultralytics takes arrays as BGR
    with lock:
        results = model.predict(bgr, **kwargs)
    out = []
    for r in results:
        boxes = r.boxes
        out.append((boxes.xyxy.cpu().numpy(), boxes.cls.cpu().numpy(), boxes.conf.cpu().numpy()))
    return out


def crop_images(
    storage: Storage,
    image_ids: Sequence[str],
    model: Any,
    cfg: CropSettings,
    slot: Callable[[], AbstractContextManager[Any]] = nullcontext,
    stats: Counter[str] | None = None,
) -> list[dict[str, Any]]:
    """Detect, decide and store crops for ``image_ids``; one row per id, in input order."""
    stats = stats if stats is not None else Counter()
    rows: list[dict[str, Any]] = []

    def finish(image_id: str, arr: np.ndarray, det_row: dict[str, Any]) -> dict[str, Any]:
        row = {"image_id": image_id, **det_row, "crop_id": None, "crop_width": None, "crop_height": None}
        if row["status"] == KEPT:
            x0, y0, x1, y1 = row["bbox"]
            crop = arr[y0:y1, x0:x1]
            row["crop_id"] = storage.put_image(encode_jpeg(crop, cfg.jpeg_quality))
            row["crop_width"], row["crop_height"] = int(crop.shape[1]), int(crop.shape[0])
        return row

    by_id: dict[str, Future[dict[str, Any]] | dict[str, Any]] = {}
    with ThreadPoolExecutor(max_workers=cfg.decode_workers) as pool:
        with slot():
            for good, bad in stream_batches(image_ids, storage.get_image, cfg.batch_size, pool):
                for image_id, _, err in bad:
                    by_id[image_id] = {"image_id": image_id, "status": DROPPED,
                                       "reason": "missing" if err == "missing" else "decode_error",
                                       "bbox": None, "det_class": None, "det_conf": None, "crop_id": None,
                                       "crop_width": None, "crop_height": None}
                if not good:
                    continue
                preds = predict_batch(model, [a for _, a, _ in good], cfg)
                stats["batches"] += 1
                stats["inferred"] += len(good)
                for (image_id, arr, _), (xyxy, cls, conf) in zip(good, preds, strict=True):
                    det = largest_box(xyxy, cls, conf, cfg.keep_classes, cfg.conf)
                    decision = crop_decision(det, arr.shape[1], arr.shape[0], cfg)
                    by_id[image_id] = pool.submit(finish, image_id, arr, decision)  # encode + store in a thread
        for image_id in image_ids:
            done = by_id[image_id]
            rows.append(done.result() if isinstance(done, Future) else done)
    for row in rows:
        stats[f"{row['status']}:{row['reason'] or ''}".rstrip(":")] += 1
    return rows


# -- shard task -------------------------------------------------------------------------
def crop_config(cfg: CropSettings) -> dict[str, Any]:
    """The config a shard is keyed on: crop settings + what identifies the weights
    (decode_workers and gpu_limit do not change results and are left out)."""
    from models.detector import weights_version

    data = cfg.model_dump(mode="json")
    data.pop("decode_workers", None)
    data.pop("gpu_limit", None)
    data["weights_version"] = weights_version(cfg.weights)
    return data


def shard_key(image_ids: Sequence[str], config: dict[str, Any]) -> str:
    return f"work/{STAGE}/{content_key(STAGE, VERSION, image_ids, config)}.parquet"


def crop_shard_to_storage(
    storage: Storage,
    image_ids: list[str],
    cfg: CropSettings,
    model: Any = None,
    slot: Callable[[], AbstractContextManager[Any]] = nullcontext,
    config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Crop one shard and write its rows under ``work/crop/<content key>.parquet`` (+ a
    ``.stats.json``). A shard whose result is already stored is not recomputed (resume
    without Prefect's cache too). Returns ``{"key", "stats", "reused"}``."""
    config = config if config is not None else crop_config(cfg)
    key = shard_key(image_ids, config)
    stats_key = key.removesuffix(".parquet") + ".stats.json"
    if storage.exists(key) and storage.exists(stats_key):
        return {"key": key, "stats": json.loads(storage.get_text(stats_key)), "reused": True}
    if model is None:
        from models.detector import load_detector

        model = load_detector(cfg.weights)
    stats: Counter[str] = Counter()
    rows = crop_images(storage, image_ids, model, cfg, slot=slot, stats=stats)
    table = pa.Table.from_pylist(rows, schema=CROP_SCHEMA)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    storage.put(key, buf.getvalue())
    out_stats = dict(sorted(stats.items()))
    storage.put_text(stats_key, json.dumps(out_stats, sort_keys=True))
    return {"key": key, "stats": out_stats, "reused": False}


def gpu_slot(name: str) -> Callable[[], AbstractContextManager[Any]]:
    """A factory for Prefect's global concurrency limit ``name`` (one slot). With
    ``strict=False`` a limit that does not exist is a warning, not an error."""

    def slot() -> AbstractContextManager[Any]:
        if not name:
            return nullcontext()
        from prefect.concurrency.sync import concurrency

        return concurrency(name, occupy=1, strict=False)

    return slot


@task(
    name="crop-shard",
    cache_key_fn=shard_cache_key_fn(STAGE, VERSION, ids_param="image_ids", config_param="config"),
    persist_result=True,
    retries=1,
    retry_delay_seconds=10,
)
def crop_shard_task(
    storage_uri: str | None,
    image_ids: list[str],
    config: dict[str, Any],
    gpu_limit: str = "gpu",
    decode_workers: int = 4,
) -> dict[str, Any]:
    """Cached on (stage, version, sorted image ids, crop config incl. weights version):
    a rerun with unchanged inputs loads no model and runs no inference. ``gpu_limit`` and
    ``decode_workers`` do not change results and are not part of the key."""
    fields = set(CropSettings.model_fields)
    cfg = CropSettings(**{k: v for k, v in config.items() if k in fields}, decode_workers=decode_workers)
    return crop_shard_to_storage(
        open_storage(storage_uri), image_ids, cfg, slot=gpu_slot(gpu_limit), config=config
    )
