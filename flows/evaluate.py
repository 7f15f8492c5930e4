"""Evaluate flow: a registered classifier on a dataset's test split, and (on request) the
champion/challenger promotion.

    python -m flows.evaluate [--model latest|VERSION|PATH|s3://…] [--dataset latest|VERSION]
                             [--storage URI] [--promote] [--force] [--no-calibrate]

Everything is written under ``models/classifier/<version>/eval/<dataset version>/``
(``tasks/evaluate.py``): ``metrics.json`` (top-1, top-5, macro-F1, ECE before/after the
temperature, most-confused pairs, suggested merges, the top label issues), ``report.md``,
``classification_report.{json,txt}``, ``confusion.png``, ``per_class_accuracy.png``,
``reliability.png``, ``confused/NN-<true>--as--<predicted>.png`` galleries,
``merge_map.yaml`` (a ready ``classes.merge_map``), ``label_issues.csv`` and
``label_issues.png``. The temperature fitted on val goes into the version's
``config.json`` and ``meta.json`` (served probabilities are calibrated), unless
``--no-calibrate``. Published as Prefect artifacts: the report (markdown), per-class and
confused-pair tables, label issues, merge suggestions and links to the PNGs.

``--promote`` moves ``models/classifier/latest.json`` to this version only when its test
top-1 is at least the current one's on the same test split; ``--force`` moves it anyway.
The decision and both numbers are recorded (``promotion.json`` in the version).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from carflow.registry import Registry, RegistryError
from carflow.settings import get_settings
from carflow.storage import open_storage
from flows.entry import entry_point
from tasks.evaluate import EvaluationError, evaluate_version_task, promote_task, report_markdown


def publish_evaluation(summary: Mapping[str, Any], decision: Mapping[str, Any] | None = None) -> None:
    """Prefect artifacts of one evaluation (also used by the train flow)."""
    files = summary.get("files", {})
    md = report_markdown(summary)
    if decision:
        md += (f"\n### Promotion\n\n- {'promoted to latest' if decision['promoted'] else 'not promoted'}: "
               f"{decision['reason']}\n- candidate {decision['candidate']}: {decision.get('candidate_value')}\n"
               f"- current {decision.get('incumbent')}: {decision.get('incumbent_value')}\n")
    create_markdown_artifact(key="classifier-evaluation", markdown=md,
                             description=f"classifier {summary['version']} on dataset {summary['dataset_version']}")
    per_class = summary.get("per_class") or []
    if per_class:
        create_table_artifact(key="classifier-per-class", table=list(per_class),
                              description="test precision / recall / F1 / support per class")
    if summary.get("confused_pairs"):
        create_table_artifact(key="classifier-confused-pairs", description="most-confused (true, predicted) pairs",
                              table=[{k: p[k] for k in ("true", "predicted", "count", "rate", "reverse_count", "gallery")}
                                     for p in summary["confused_pairs"]])
    if summary.get("label_issues", {}).get("top"):
        create_table_artifact(key="classifier-label-issues", table=list(summary["label_issues"]["top"]),
                              description="likely label errors (cleanlab), most likely first")
    if "suggested_merges" in summary:
        create_table_artifact(key="classifier-merge-suggestions",
                              table=[{"a": m["classes"][0], "b": m["classes"][1], "joint_probability": m["joint_probability"],
                                      "a_looks_b": m["given_a_looks_b"], "b_looks_a": m["given_b_looks_a"]}
                                     for m in summary["suggested_merges"]] or [{"a": "none", "b": ""}],
                              description=f"classes.merge_map snippet: {files.get('merge_map.yaml', '')}")
    for name in ("confusion.png", "per_class_accuracy.png", "reliability.png", "label_issues.png"):
        if name in files:
            create_link_artifact(key=f"classifier-{name.removesuffix('.png').replace('_', '-')}", link=files[name],
                                 link_text=name)


@flow(name="evaluate", log_prints=True)
def evaluate(
    storage: str | None = None,
    model: str = "latest",
    dataset: str = "latest",
    promote: bool = False,
    force: bool = False,
    calibrate: bool = True,
) -> dict[str, Any]:
    """Evaluate classifier ``model`` on dataset ``dataset``'s val/test splits; with
    ``promote`` (or ``force``) run champion/challenger."""
    logger = get_run_logger()
    config = get_settings().evaluate.model_dump(mode="json")
    summary = evaluate_version_task(storage, model, dataset, config, calibrate)
    decision = promote_task(storage, summary["version"], force, config) if (promote or force) else None
    publish_evaluation(summary, decision)
    headline = {k: summary.get(k) for k in ("version", "dataset_version", "n_test", "top1", "top5", "macro_f1",
                                             "ece_before", "ece_after", "temperature")}
    logger.info("evaluation: %s", headline)
    if decision:
        logger.info("promotion: %s", decision)
    return {**headline, "files": summary.get("files", {}), "suggested_merges": summary.get("suggested_merges", []),
            "label_issues": (summary.get("label_issues") or {}).get("count"), "promotion": decision}


@entry_point
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.evaluate", description=evaluate.__doc__)
    parser.add_argument("--storage", help="storage URI (default: settings storage)")
    parser.add_argument("--model", default="latest", help="classifier: latest, a version, a path or s3:// URI")
    parser.add_argument("--dataset", default="latest", help="dataset version whose test split to use")
    parser.add_argument("--promote", action="store_true", help="move latest here if top-1 >= the current one's")
    parser.add_argument("--force", action="store_true", help="move latest here whatever the numbers")
    parser.add_argument("--no-calibrate", action="store_true", help="keep the stored temperature")
    a = parser.parse_args(argv)
    from tasks.export import ExportNotFound, open_export

    try:  # a user's mistake is one line, before any flow starts
        store = open_storage(a.storage)
        Registry(store).resolve("classifier", a.model, setting="--model")
        open_export(store, a.dataset)
    except (RegistryError, ExportNotFound) as exc:
        print(f"carflow evaluate: {exc}", file=sys.stderr)
        return 2
    try:
        out = evaluate(a.storage, a.model, a.dataset, a.promote, a.force, not a.no_calibrate)
    except (RegistryError, ExportNotFound, EvaluationError) as exc:
        print(f"carflow evaluate: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(out, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
