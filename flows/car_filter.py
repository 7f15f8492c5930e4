"""Car filter flows: train a car/no-car model from labels, score the clean manifest.

    python -m flows.car_filter kit   [--n 500] [--out labelling/car_filter] [--seed 0]
    python -m flows.car_filter train --labels <labels.csv | folder with car/ no_car/> [--epochs N] [--weights none]
    python -m flows.car_filter score [--model latest|VERSION|PATH|URI] [--threshold 0.7]

``train`` registers ``models/car_filter/<version>/`` (``model.keras``, ``metrics.json``,
``split.csv``, then ``meta.json``) and moves the registry's ``latest`` pointer to it.
``score`` scores with ``--model`` / ``car_filter.model`` / ``latest`` (resolved by the
registry), reads ``manifests/clean/manifest.parquet`` (it must be current: its recorded
lineage is checked) and writes
``manifests/car_filter/manifest.parquet``: every row gets ``p_car``; kept rows below
``car_filter.threshold`` are dropped with reason ``no_car``. Shard outputs live in storage
under (stage, model version, sorted image ids, config; not the threshold): a rerun does no
inference, a new threshold rescores nothing, a new model version rescores everything.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from typing import Annotated, Any

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from pydantic import Field

from carflow.keys import labelling_prefix
from carflow.manifest import CLEAN_SCHEMA, input_key, read_input, to_pandas
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
from tasks.car_filter import (
    REASON,
    STAGE,
    apply_threshold_task,
    resolve_model,
    score_shard_task,
    scoring_config,
)
from tasks.car_filter_train import train_task
from tasks.labelling import import_labels, sample_for_labelling, write_labelling_kit
from tasks.runners import task_runner
from tasks.shards import plan_input, run_shards


class KitParams(FlowParams):
    """A labelling kit of the clean manifest's kept photos."""

    storage: str | None = storage_field()
    n: int = Field(500, ge=1, description="photos in the kit (a stratified sample of the kept photos)")
    out: str = Field(labelling_prefix("car_filter"), description="storage prefix of the kit")
    seed: int = Field(0, description="sampling seed")


class CarFilterTrainParams(FlowParams):
    """Labels → a new car filter version, promoted to latest. Unset fields take the
    ``car_filter`` settings."""

    labels: str = Field(description="labels.csv, or a folder / s3:// prefix with car/ and no_car/ sub-folders")
    storage: str | None = storage_field()
    epochs: int | None = Field(None, ge=1, description="training epochs (default: car_filter.epochs)")
    weights: str | None = Field(None, description="imagenet | none | a path or s3:// URI (car_filter.weights)")
    image_size: int | None = Field(None, ge=32, description="input side in pixels (car_filter.image_size)")
    alpha: float | None = Field(None, gt=0, description="MobileNetV2 width multiplier (car_filter.alpha)")
    batch_size: int | None = Field(None, ge=1, description="training batch size (car_filter.batch_size)")
    patience: int | None = Field(None, ge=0, description="early stopping patience in epochs (car_filter.patience)")
    command: Annotated[str | None, Flag(cli=False)] = Field(
        None, description="the command line recorded in the version's meta.json (set by the CLI)")


class ScoreParams(FlowParams):
    """The clean manifest → the car filter manifest."""

    storage: str | None = storage_field()
    model: str | None = Field(None, description="latest, a version id, a version folder or its model.keras "
                                                "(path or s3:// URI); default: car_filter.model, else latest")
    shard_size: int | None = Field(None, ge=1, description="images per shard task (default: car_filter.shard_size)")
    threshold: float | None = Field(None, ge=0, le=1, description="drop kept photos with p_car below this "
                                                                  "(default: car_filter.threshold)")
    refresh: bool = refresh_field("score every image")


def _cfg(**overrides: Any):
    cfg = get_settings().car_filter
    update = {k: v for k, v in overrides.items() if v is not None}
    return cfg.model_copy(update=update) if update else cfg


@params_flow(name="car-filter-kit", log_prints=True)
def labelling_kit(params: KitParams = KitParams()) -> dict[str, Any]:
    """A stratified sample of kept images as a labelling kit (CSV + thumbnails + sheets)."""
    store = open_storage(params.storage)
    prefix = get_settings().runtime.manifests_prefix
    df = to_pandas(read_input(store, input_key(store, STAGE, prefix=prefix), CLEAN_SCHEMA).table)
    return write_labelling_kit(store, sample_for_labelling(df, params.n, params.seed), params.out)


@params_flow(name="car-filter-train", log_prints=True)
def train(params: CarFilterTrainParams) -> dict[str, Any]:
    """Labels (CSV or car/no_car folders) → a new registered model version
    (``models/car_filter/<version>/``), promoted to ``latest``."""
    logger = get_run_logger()
    p = params
    cfg = _cfg(weights=p.weights, image_size=p.image_size, alpha=p.alpha, batch_size=p.batch_size,
               patience=p.patience)
    labels_df = import_labels(p.labels)
    logger.info("%d labels: %s", len(labels_df), labels_df["label"].value_counts().to_dict())
    result = train_task(p.storage, labels_df, cfg.model_dump(mode="json"), epochs=p.epochs, command=p.command)
    m = result["metrics"]
    create_markdown_artifact(
        key="car-filter-model",
        markdown=f"## Car filter {result['version']}\n\n- model: `{result['model']}`\n"
        f"- val accuracy {m['accuracy']:.3f} at threshold {m['threshold']}, car precision "
        f"{m['precision']:.3f}, car recall {m['recall']:.3f}, no_car recall {m['no_car_recall']:.3f}\n"
        f"- data: {result['counts']}\n",
    )
    logger.info("car filter %s: %s", result["version"], m)
    return result


@params_flow(name="car-filter-score", log_prints=True, task_runner=task_runner("cpu"))
def score(params: ScoreParams = ScoreParams()) -> dict[str, Any]:
    """Clean manifest → ``manifests/car_filter/manifest.parquet`` with ``p_car``."""
    logger = get_run_logger()
    storage, model, shard_size = params.storage, params.model, params.shard_size
    cfg = _cfg(threshold=params.threshold)
    store = open_storage(storage)
    prefix = get_settings().runtime.manifests_prefix
    source = plan_input(store, input_key(store, STAGE, prefix=prefix), CLEAN_SCHEMA, shard_size or cfg.shard_size)
    chosen = resolve_model(store, cfg, model)
    shards = source.shards
    config = scoring_config(cfg, chosen)
    results, fresh = run_shards(
        score_shard_task,
        shards,
        lambda ids: {"storage_uri": storage, "image_ids": ids, "model_uri": chosen["model"],
                     "model_version": chosen["version"], "config": config},
        refresh=params.refresh,
    )
    scored = sum(fresh)
    logger.info("%d shards: %d reused from storage, %d images scored", len(shards), len(shards) - len(fresh),
                scored)

    counted = apply_threshold_task(storage, source.key, source.hash, [r["key"] for r in results], cfg.threshold,
                                   prefix)
    uri, reasons, kept = counted["manifest"], counted["dropped_by_reason"], counted["kept"]
    create_table_artifact(
        key="car-filter-counts",
        table=[{"reason": "kept", "rows": kept}] + [{"reason": r, "rows": n} for r, n in sorted(reasons.items())],
        description=f"Car filter {chosen['version']} at threshold {cfg.threshold}",
    )
    summary = {
        "manifest": uri,
        "input": store.uri(source.key),
        "model": chosen["model"],
        "model_version": chosen["version"],
        "threshold": cfg.threshold,
        "rows": counted["rows"],
        "kept": kept,
        "no_car": int(reasons.get(REASON, 0)),
        "dropped_by_reason": dict(sorted(reasons.items())),
        "shards": len(shards),
        "cached_shards": len(shards) - len(fresh),
        "scored_images": scored,
    }
    logger.info("car filter manifest %s: kept %d, no_car %d", uri, kept, summary["no_car"])
    return summary


#: sub-command → (its flow, its parameter model)
COMMANDS: dict[str, tuple[Any, type[FlowParams], str]] = {
    "kit": (labelling_kit, KitParams, "write a labelling kit from the clean manifest"),
    "train": (train, CarFilterTrainParams, "train a new model version from labels"),
    "score": (score, ScoreParams, "score the clean manifest"),
}


def parser() -> argparse.ArgumentParser:
    p = make_parser("python -m flows.car_filter", __doc__)
    p.add_argument("--storage", default=argparse.SUPPRESS, help=ScoreParams.model_fields["storage"].description)
    sub = p.add_subparsers(dest="command", required=True, parser_class=type(p))
    for name, (_flow, model, help_) in COMMANDS.items():
        add_arguments(sub.add_parser(name, help=help_, description=model.__doc__), model)
    return p


@entry_point
def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    run, model, _help = COMMANDS[a.command]
    fixed = {}
    if a.command == "train":
        fixed["command"] = shlex.join(["python", "-m", "flows.car_filter", *(sys.argv[1:] if argv is None else argv)])
    result = run(parse_params(model, a, **fixed))
    print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
