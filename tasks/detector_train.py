"""Fine-tuning the crop stage's YOLO detector, and scoring boxes against ground truth.

:func:`finetune_detector` trains an ultralytics model (default: ``yolov5nu.yaml``, random
init, so nothing is downloaded) on a YOLO ``data.yaml`` dataset and registers the result
(:class:`carflow.registry.Registry`, kind ``detector``) as
``models/detector/<version>/weights.pt`` + ``meta.json``, then moves the ``latest``
pointer to it (``crop.weights=latest`` uses it). The version is a hash of the dataset's content
(:func:`dataset_fingerprint`: images, labels, class names), the
training parameters and the crop settings, so training the same data with the same parameters again finds the
stored weights and trains nothing (``force=True`` retrains).

The crop settings the boxes depend on (:func:`crop_meta`: ``imgsz``, by default the
training size, ``conf`` and ``keep_classes``) are stored in the version's ``meta.json``
under ``crop``; the crop stage and serving both read them from the version they use
(:func:`models.crop.detector_settings`), so they cannot disagree.

:func:`models.detector.version_weights` turns a stored version into what ``crop.weights``
accepts: a local path for local storage, the ``s3://`` URI otherwise.

Scoring boxes against ground truth (``box_hits``) is in :mod:`tasks.evaluation`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from prefect import task
from prefect.cache_policies import NO_CACHE

from carflow.registry import Registry, RegistryError
from carflow.storage import Storage
from models.detector import version_weights

log = logging.getLogger(__name__)

#: bump when the training recipe changes in a way that changes the weights
CODE_VERSION = "1"
KIND = "detector"
#: the fine-tune recipe (ultralytics ``train`` arguments). From scratch on a few hundred
#: synthetic photos: ``optimizer=auto`` would pick AdamW at lr 0.002*5/(4+nc) = 1.2e-4 for
#: nc=80, far too slow from random init; mosaic off (the demo photos are one car each).
TRAIN_DEFAULTS: dict[str, Any] = {
    "model": "yolov5nu.yaml",
    "epochs": 30,
    "imgsz": 320,
    "batch": 16,
    "optimizer": "AdamW",
    "lr0": 0.003,
    "warmup_epochs": 1,
    "mosaic": 0.0,
    "seed": 0,
}
#: ultralytics arguments that never change the weights (kept out of the version hash)
_RUN_ONLY = {"device", "workers"}


def train_params(**overrides: Any) -> dict[str, Any]:
    """:data:`TRAIN_DEFAULTS` with the non-``None`` overrides applied."""
    return {**TRAIN_DEFAULTS, **{k: v for k, v in overrides.items() if v is not None}}


def crop_meta(params: dict[str, Any], crop: dict[str, Any] | None = None) -> dict[str, Any]:
    """The crop settings stored with a fine-tune (``meta.json`` → ``crop``): ``imgsz``
    (default: the training ``imgsz``), ``conf`` and ``keep_classes`` (default: ``crop.*``'s
    defaults), each overridden by ``crop``."""
    from carflow.settings import CropSettings
    from models.crop import DETECTOR_FIELDS

    defaults = CropSettings(imgsz=int(params.get("imgsz") or CropSettings().imgsz))
    return CropSettings(**{**defaults.model_dump(include=set(DETECTOR_FIELDS)), **(crop or {})}).model_dump(
        include=set(DETECTOR_FIELDS))


def detector_version(fingerprint: str, params: dict[str, Any], crop: dict[str, Any] | None = None) -> str:
    """Content version of a fine-tune: dataset fingerprint + parameters + crop settings
    (:func:`crop_meta`) + recipe version."""
    relevant = {k: v for k, v in sorted(params.items()) if k not in _RUN_ONLY}
    doc = json.dumps({"data": fingerprint, "params": relevant, "crop": crop_meta(params, crop), "code": CODE_VERSION},
                     sort_keys=True, default=str)
    return hashlib.sha256(doc.encode()).hexdigest()[:16]


def check_weights(spec: str, storage: Storage | str | None = None) -> str:
    """Check ``crop.weights`` before a run: a missing file (or ``latest`` with no fine-tune
    registered in ``storage``) raises :class:`models.detector.DetectorWeightsError` naming
    the setting; a hub name is loaded (downloaded where there is a network), so an offline
    run without the file fails here rather than after the crawl. An ``s3://`` object is
    checked when the crop stage downloads it."""
    from models.detector import is_random_init, load_detector, registered_weights, resolve_weights

    spec = registered_weights(spec, storage)
    if spec.strip().startswith("s3://") or is_random_init(spec):
        return spec
    resolved = resolve_weights(spec)
    if not Path(resolved).is_file():  # a hub name, not yet downloaded
        load_detector(spec)
    return resolved


def stored_detector(store: Storage, version: str) -> dict[str, Any] | None:
    """The registered fine-tune ``version`` (its meta plus ``weights``), or ``None``."""
    try:
        found = Registry(store).get(KIND, version)
    except RegistryError:
        return None
    if not found.exists("weights.pt"):
        return None
    return {**found.meta, "weights": version_weights(found), "uri": found.uri("weights.pt")}


def finetune_detector(
    store: Storage,
    data_yaml: str | Path,
    params: dict[str, Any] | None = None,
    force: bool = False,
    command: str | None = None,
    extra: dict[str, Any] | None = None,
    crop: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Fine-tune on ``data_yaml`` (or reuse the stored version) → ``{"version", "weights"
    (for ``crop.weights``), "uri", "cached", "train_seconds", "params", "crop", …}``.
    ``extra`` is recorded in ``meta.json`` (e.g. where the data came from), ``crop``
    overrides the stored crop settings (:func:`crop_meta`). The ``latest`` pointer
    moves to the version (a stored one too: the last fine-tune asked for is latest)."""
    params = train_params(**(params or {}))
    fingerprint = dataset_fingerprint(data_yaml)
    version = detector_version(fingerprint, params, crop)
    registry = Registry(store)
    if not force:
        found = stored_detector(store, version)
        if found is not None:
            log.info("detector %s already trained: %s", version, found["uri"])
            registry.promote(KIND, version)
            return {**found, "cached": True}

    from models.detector import import_ultralytics, place_font

    place_font()  # the dataset check wants Arial.ttf: a local copy, never a download
    ultralytics = import_ultralytics()
    args = {k: v for k, v in params.items() if k != "model"}
    device = args.pop("device", None) or None
    with tempfile.TemporaryDirectory(prefix="carflow-detector-") as tmp:
        model = ultralytics.YOLO(params["model"])
        t0 = time.monotonic()
        model.train(
            data=str(data_yaml), device=device, workers=int(args.pop("workers", 0)), project=tmp, name="ft",
            exist_ok=True, plots=False, val=False, amp=False, deterministic=False, verbose=False, patience=0,
            **args,
        )
        train_s = time.monotonic() - t0
        last = Path(model.trainer.last)
        if not last.is_file():
            raise RuntimeError(f"ultralytics training wrote no checkpoint ({last})")
        weights = last.read_bytes()
    meta = {
        "stage": "detector",
        "params": params,
        "data": str(data_yaml),
        "data_fingerprint": fingerprint,
        "train_images": _count_images(data_yaml),
        "train_seconds": round(train_s, 1),
        "device": str(getattr(model.trainer, "device", device or "")),
        "ultralytics": ultralytics.__version__,
        "command": command or shlex.join(sys.argv),
        "code_version": CODE_VERSION,
        "crop": crop_meta(params, crop),
        **(extra or {}),
    }
    stored = registry.put_version(KIND, {"weights.pt": weights}, meta, version=version)
    registry.promote(KIND, stored)
    return {**stored.meta, "weights": version_weights(stored), "uri": stored.uri("weights.pt"), "cached": False}


@task(name="detector-finetune", cache_policy=NO_CACHE)
def finetune_task(
    storage_uri: str | None, data_yaml: str, params: dict[str, Any] | None = None,
    force: bool = False, command: str | None = None,
    extra: dict[str, Any] | None = None, crop: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Training holds a slot of the ``gpu`` global concurrency limit (a missing limit, or
    no Prefect API, only warns)."""
    from carflow.storage import open_storage
    from tasks.shards import gpu_slot

    store = open_storage(storage_uri)
    if not force:  # a cache hit needs no slot
        version = detector_version(dataset_fingerprint(data_yaml), train_params(**(params or {})), crop)
        found = stored_detector(store, version)
        if found is not None:
            Registry(store).promote(KIND, version)
            return {**found, "cached": True}
    with gpu_slot("gpu"):
        return finetune_detector(store, data_yaml, params, force, command, extra, crop)


def _count_images(data_yaml: str | Path) -> int | None:
    import yaml

    doc = yaml.safe_load(Path(data_yaml).read_text())
    folder = Path(doc.get("path") or Path(data_yaml).parent) / str(doc.get("train", ""))
    return sum(1 for f in folder.iterdir() if f.is_file()) if folder.is_dir() else None




def dataset_fingerprint(data_yaml: str | Path) -> str:
    """sha256 over a YOLO dataset's content: every image and label file under its
    ``train``/``val`` folders (relative name + bytes) and the class names. The same photos
    and boxes give the same fingerprint wherever the folder lives."""
    data_yaml = Path(data_yaml)
    doc = yaml.safe_load(data_yaml.read_text())
    root = Path(doc.get("path") or data_yaml.parent)
    h = hashlib.sha256()
    h.update(json.dumps({str(k): v for k, v in dict(doc.get("names") or {}).items()}, sort_keys=True).encode())
    for split in ("train", "val"):
        rel = doc.get(split)
        if not rel:
            continue
        h.update(f"\0split {split} {rel}\n".encode())
        images = root / rel
        # ultralytics' rule: the last /images/ in an image path becomes /labels/
        text = f"{images}{os.sep}"
        sa, sb = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
        labels = Path(sb.join(text.rsplit(sa, 1))) if sa in text else None
        for folder in (images, labels):
            if folder is None or not folder.is_dir():
                continue
            for f in sorted(folder.iterdir()):
                if f.is_file():
                    h.update(f"{f.name}\0".encode())
                    h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()
