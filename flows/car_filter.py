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
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from carflow.keys import labelling_prefix
from carflow.manifest import CLEAN_SCHEMA, input_key, read_input, to_pandas
from carflow.settings import get_settings
from carflow.storage import open_storage
from flows.entry import entry_point
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
from tasks.shards import PLAN_COLUMNS, plan_shards, run_shards


def _cfg(**overrides: Any):
    cfg = get_settings().car_filter
    update = {k: v for k, v in overrides.items() if v is not None}
    return cfg.model_copy(update=update) if update else cfg


@flow(name="car-filter-kit", log_prints=True)
def labelling_kit(
    storage: str | None = None, n: int = 500, out: str = labelling_prefix("car_filter"), seed: int = 0
) -> dict[str, Any]:
    """A stratified sample of kept images as a labelling kit (CSV + thumbnails + sheets)."""
    store = open_storage(storage)
    prefix = get_settings().runtime.manifests_prefix
    df = to_pandas(read_input(store, input_key(store, STAGE, prefix=prefix), CLEAN_SCHEMA).table)
    return write_labelling_kit(store, sample_for_labelling(df, n, seed), out)


@flow(name="car-filter-train", log_prints=True)
def train(
    labels: str,
    storage: str | None = None,
    epochs: int | None = None,
    weights: str | None = None,
    image_size: int | None = None,
    alpha: float | None = None,
    command: str | None = None,
    batch_size: int | None = None,
    patience: int | None = None,
) -> dict[str, Any]:
    """Labels (CSV or car/no_car folders) → a new registered model version
    (``models/car_filter/<version>/``), promoted to ``latest``."""
    logger = get_run_logger()
    cfg = _cfg(weights=weights, image_size=image_size, alpha=alpha, batch_size=batch_size, patience=patience)
    labels_df = import_labels(labels)
    logger.info("%d labels: %s", len(labels_df), labels_df["label"].value_counts().to_dict())
    result = train_task(storage, labels_df, cfg.model_dump(mode="json"), epochs=epochs, command=command)
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


@flow(name="car-filter-score", log_prints=True, task_runner=task_runner("cpu"))
def score(
    storage: str | None = None,
    model: str | None = None,
    shard_size: int | None = None,
    threshold: float | None = None,
) -> dict[str, Any]:
    """Clean manifest → ``manifests/car_filter/manifest.parquet`` with ``p_car``."""
    logger = get_run_logger()
    cfg = _cfg(threshold=threshold)
    store = open_storage(storage)
    prefix = get_settings().runtime.manifests_prefix
    source = read_input(store, input_key(store, STAGE, prefix=prefix), CLEAN_SCHEMA, columns=PLAN_COLUMNS)
    chosen = resolve_model(store, cfg, model)
    shards = plan_shards(source.table, shard_size or cfg.shard_size)
    config = scoring_config(cfg, chosen)
    results, fresh = run_shards(
        score_shard_task,
        shards,
        lambda ids: {"storage_uri": storage, "image_ids": ids, "model_uri": chosen["model"],
                     "model_version": chosen["version"], "config": config},
    )
    scored = sum(len(ids) for ids in fresh)
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


@entry_point
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.car_filter", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--storage", help="storage URI (default: settings storage)")
    sub = parser.add_subparsers(dest="command", required=True)
    k = sub.add_parser("kit", help="write a labelling kit from the clean manifest")
    k.add_argument("--n", type=int, default=500)
    k.add_argument("--out", default=labelling_prefix("car_filter"), help="storage prefix of the kit")
    k.add_argument("--seed", type=int, default=0)
    t = sub.add_parser("train", help="train a new model version from labels")
    t.add_argument("--labels", required=True, help="labels.csv, or a folder/s3:// prefix with car/ and no_car/")
    t.add_argument("--epochs", type=int)
    t.add_argument("--weights", help="imagenet | none | path or s3:// URI (car_filter.weights)")
    t.add_argument("--image-size", type=int)
    t.add_argument("--alpha", type=float)
    t.add_argument("--batch-size", type=int)
    t.add_argument("--patience", type=int, help="early stopping patience in epochs")
    s = sub.add_parser("score", help="score the clean manifest")
    s.add_argument("--model", help="latest, a version id, a version folder or its model.keras (path or s3:// URI); "
                   "default: car_filter.model, else latest")
    s.add_argument("--shard-size", type=int)
    s.add_argument("--threshold", type=float)
    a = parser.parse_args(argv)
    if a.command == "kit":
        result = labelling_kit(a.storage, a.n, a.out, a.seed)
    elif a.command == "train":
        cmd = shlex.join(["python", "-m", "flows.car_filter", *(sys.argv[1:] if argv is None else argv)])
        result = train(a.labels, a.storage, a.epochs, a.weights, a.image_size, a.alpha, command=cmd,
                       batch_size=a.batch_size, patience=a.patience)
    else:
        result = score(a.storage, a.model, a.shard_size, a.threshold)
    print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
