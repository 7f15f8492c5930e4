"""Crop flow: the largest vehicle of each kept image, as a new content-addressed JPEG;
and the detector fine-tune that makes weights for it.

    python -m flows.crop [--storage URI] [--shard-size N] [--source clean|car_filter]
                         [--weights latest|PATH|URI|HUB-NAME|none] [--imgsz N] [--conf P]
    python -m flows.crop train --data data.yaml [--epochs N] [--imgsz N] [--batch N]
                               [--model yolov5nu.yaml|PATH] [--force]

``crop`` reads the manifest of ``source`` (a stage name or a manifest key) when given —
the nightly and demo DAGs always pass it — else ``manifests/car_filter/manifest.parquet``,
else (the car filter never ran here) ``manifests/clean/manifest.parquet``; the input must
be current (its lineage is checked, :func:`carflow.manifest.read_input`). It writes
``manifests/crop/manifest.parquet`` with
the input's columns plus ``bbox`` (padded crop box ``[x0, y0, x1, y1]``, x1/y1
exclusive, in the image's pixels), ``det_class`` (``vehicle``), ``det_conf`` and
``crop_id`` (the crop's image id; ``image_id`` stays the uncropped photo). Kept rows the
detector rejects are dropped with reason ``no_vehicle``, ``too_small`` or
``decode_error``. Shards are cached tasks keyed on stage, version, sorted image ids and
the crop config (including the weights spec and, for a local file, its sha256); each
holds one slot of the Prefect global concurrency limit ``crop.gpu_limit`` (``gpu``)
while it runs inference — a limit that does not exist is only a warning.

``train`` fine-tunes a YOLO model on an ultralytics ``data.yaml`` dataset
(``tasks/detector_train.py``) and registers ``models/detector/<version>/weights.pt`` +
``meta.json``, then moves the registry's ``latest`` pointer to it; the version hashes the
dataset content and the training parameters, so the same data and parameters reuse the
stored weights. ``crop.weights=latest`` (``--weights latest``) crops with it.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from typing import Annotated, Any

from prefect import get_run_logger
from prefect.artifacts import create_table_artifact
from pydantic import Field

from carflow.manifest import CLEAN_SCHEMA, input_key
from carflow.settings import get_settings
from carflow.storage import open_storage
from flows.entry import entry_point
from flows.params import (
    Flag,
    FlowParams,
    add_arguments,
    make_parser,
    params_flow,
    parse_params,
    refresh_field,
    storage_field,
)
from models.detector import registered_weights
from tasks.crop import crop_config, crop_shard_task, merge_crops_task
from tasks.detector_train import finetune_task
from tasks.shards import plan_input, run_shards


class CropParams(FlowParams):
    """A kept photo → its largest vehicle, as a new content-addressed JPEG. Unset fields
    take the ``crop`` settings."""

    storage: str | None = storage_field()
    shard_size: int | None = Field(None, ge=1, description="images per shard task (default: ingest.shard_size)")
    source: str | None = Field(None, description="input stage (clean, car_filter) or manifest key (default: "
                                                 "car_filter if it has run, else clean)")
    weights: str | None = Field(None, description="crop.weights: latest (the registry's fine-tune), a .pt path, "
                                                  "an s3:// URI, a hub name, or none")
    imgsz: int | None = Field(None, ge=32, description="detector input size in pixels (crop.imgsz)")
    conf: float | None = Field(None, ge=0, le=1, description="detector confidence threshold (crop.conf)")
    refresh: bool = refresh_field("detect and crop every image")


class DetectorTrainParams(FlowParams):
    """A YOLO ``data.yaml`` → a registered detector version, promoted to latest."""

    data: str = Field(description="ultralytics data.yaml (images/ + labels/, COCO names)")
    storage: str | None = storage_field()
    epochs: int | None = Field(None, ge=1, description="training epochs (default: tasks.detector_train.TRAIN_DEFAULTS)")
    imgsz: int | None = Field(None, ge=32, description="training image size in pixels")
    batch: int | None = Field(None, ge=1, description="training batch size")
    model: str | None = Field(None, description="architecture .yaml (random init) or .pt to start from "
                                                "(default yolov5nu.yaml)")
    device: str | None = Field(None, description="torch device (default: ultralytics' choice)")
    force: bool = Field(False, description="train even when this version (same data and parameters) is stored")
    extra: Annotated[dict[str, bool | int | float | str] | None, Flag(cli=False)] = Field(
        None, description="more ultralytics train arguments (lr0, warmup_epochs…) over "
                          "tasks.detector_train.TRAIN_DEFAULTS; the fields above win over them")
    crop: Annotated[dict[str, int | float | list[int]] | None, Flag(cli=False)] = Field(
        None, description="crop settings stored with the version (imgsz, conf, keep_classes) over the crop "
                          "settings (tasks.detector_train.crop_meta)")
    command: Annotated[str | None, Flag(cli=False)] = Field(
        None, description="the command line recorded in the version's meta.json (set by the CLI)")


@params_flow(name="crop", log_prints=True)
def crop(params: CropParams = CropParams()) -> dict[str, Any]:
    """Clean / car-filter manifest → ``manifests/crop/manifest.parquet``. ``weights``,
    ``imgsz`` and ``conf`` override ``crop.weights`` / ``crop.imgsz`` / ``crop.conf``."""
    logger = get_run_logger()
    cfg = get_settings()
    storage, shard_size = params.storage, params.shard_size
    store = open_storage(storage)
    prefix = cfg.runtime.manifests_prefix
    overrides = {"weights": params.weights, "imgsz": params.imgsz, "conf": params.conf}
    crop_cfg = cfg.crop.model_copy(update={k: v for k, v in overrides.items() if v is not None})
    # crop.weights=latest → the registered fine-tune's weights.pt (the key then names the version)
    crop_cfg = crop_cfg.model_copy(update={"weights": registered_weights(crop_cfg.weights, store)})
    source = plan_input(store, input_key(store, "crop", params.source, prefix), CLEAN_SCHEMA,
                        shard_size or cfg.ingest.shard_size)
    shards = source.shards
    config = crop_config(crop_cfg)
    results, fresh = run_shards(
        crop_shard_task,
        shards,
        lambda ids: {"storage_uri": storage, "image_ids": ids, "config": config,
                     "gpu_limit": crop_cfg.gpu_limit, "decode_workers": crop_cfg.decode_workers},
        refresh=params.refresh,
    )
    counted = merge_crops_task(storage, source.key, source.hash, [r["key"] for r in results], prefix)
    reasons = counted["dropped_by_reason"]
    summary = {
        "manifest": counted["manifest"],
        "input": store.uri(source.key),
        "rows": counted["rows"],
        "kept": counted["kept"],
        "crops": counted["crops"],
        "dropped_by_reason": reasons,
        "shards": len(shards),
        "cached_shards": len(shards) - len(fresh),
        "inferred_images": sum(fresh),
        "weights": crop_cfg.weights,
        "imgsz": crop_cfg.imgsz,
        "conf": crop_cfg.conf,
    }
    create_table_artifact(
        key="crop-counts",
        table=[{"reason": "kept", "rows": summary["kept"]}] + [{"reason": r, "rows": n} for r, n in sorted(reasons.items())],
        description="Crop stage: rows per status/reason",
    )
    logger.info("crop manifest %s: %s", summary["manifest"], {k: summary[k] for k in ("rows", "kept", "crops", "dropped_by_reason")})
    return summary


@params_flow(name="detector-train", log_prints=True)
def train_detector(params: DetectorTrainParams) -> dict[str, Any]:
    """Fine-tune the detector on a YOLO ``data.yaml`` → the registered version
    ``models/detector/<version>/weights.pt``, promoted to ``latest`` (reused when the same
    data and parameters were trained before, unless ``force``). ``extra`` are more
    ultralytics ``train`` arguments (``lr0``, ``warmup_epochs``…) over
    ``tasks.detector_train.TRAIN_DEFAULTS``; the named fields win over them. ``crop``
    (``imgsz``, ``conf``, ``keep_classes``) overrides the crop settings stored with the
    version (``tasks.detector_train.crop_meta``)."""
    logger = get_run_logger()
    p = params
    named = {"epochs": p.epochs, "imgsz": p.imgsz, "batch": p.batch, "model": p.model, "device": p.device}
    merged = {**(p.extra or {}), **{k: v for k, v in named.items() if v is not None}}
    result = finetune_task(p.storage, p.data, merged, p.force, p.command, crop=p.crop)
    create_table_artifact(
        key="detector-train",
        table=[{"version": result["version"], "weights": result["uri"], "cached": result["cached"],
                "train_seconds": result.get("train_seconds"), **{k: result["params"].get(k) for k in
                                                                  ("model", "epochs", "imgsz", "batch")}}],
        description="Detector fine-tune (crop.weights)",
    )
    logger.info("detector %s (%s): crop.weights=%s", result["version"],
                "reused" if result["cached"] else f"trained in {result.get('train_seconds')}s", result["weights"])
    return result


def parser() -> argparse.ArgumentParser:
    p = make_parser("python -m flows.crop", __doc__, CropParams)
    sub = p.add_subparsers(dest="command", parser_class=type(p))
    # the train sub-command's fields are read under train_*: `--imgsz` is crop.imgsz before `train`
    add_arguments(sub.add_parser("train", help="fine-tune the detector on a YOLO data.yaml",
                                 description=DetectorTrainParams.__doc__), DetectorTrainParams, dest_prefix="train_")
    return p


@entry_point
def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    if a.command == "train":
        cmd = shlex.join(["python", "-m", "flows.crop", *(sys.argv[1:] if argv is None else argv)])
        given = {"train_storage": a.storage} if "storage" in a else {}  # --storage before `train`
        given.update(vars(a))
        result = train_detector(parse_params(DetectorTrainParams, given, dest_prefix="train_", command=cmd))
    else:
        result = crop(parse_params(CropParams, a))
    print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
