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

from prefect import get_run_logger
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from pydantic import Field

from carflow.registry import Registry, RegistryError
from carflow.settings import get_settings
from carflow.storage import open_storage
from flows.entry import entry_point
from flows.params import (
    FlowParams,
    make_parser,
    params_flow,
    parse_params,
    storage_field,
)
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


class EvaluateParams(FlowParams):
    """A registered classifier on a dataset's test split (+ champion/challenger on request)."""

    storage: str | None = storage_field()
    model: str = Field("latest", description="classifier: latest, a version, a path or s3:// URI")
    dataset: str = Field("latest", description="dataset version whose val/test splits to use")
    promote: bool = Field(False, description="move latest here if its test top-1 is at least the current one's")
    force: bool = Field(False, description="move latest here whatever the numbers")
    calibrate: bool = Field(True, description="fit the temperature on val and store it (--no-calibrate keeps "
                                              "the stored one)")


@params_flow(name="evaluate", log_prints=True)
def evaluate(params: EvaluateParams = EvaluateParams()) -> dict[str, Any]:
    """Evaluate classifier ``model`` on dataset ``dataset``'s val/test splits; with
    ``promote`` (or ``force``) run champion/challenger."""
    logger = get_run_logger()
    p = params
    config = get_settings().evaluate.model_dump(mode="json")
    summary = evaluate_version_task(p.storage, p.model, p.dataset, config, p.calibrate)
    decision = promote_task(p.storage, summary["version"], p.force, config) if (p.promote or p.force) else None
    publish_evaluation(summary, decision)
    headline = {k: summary.get(k) for k in ("version", "dataset_version", "n_test", "top1", "top5", "macro_f1",
                                             "ece_before", "ece_after", "temperature")}
    logger.info("evaluation: %s", headline)
    if decision:
        logger.info("promotion: %s", decision)
    return {**headline, "files": summary.get("files", {}), "suggested_merges": summary.get("suggested_merges", []),
            "label_issues": (summary.get("label_issues") or {}).get("count"), "promotion": decision}


def parser() -> argparse.ArgumentParser:
    return make_parser("python -m flows.evaluate", evaluate.__doc__, EvaluateParams)


@entry_point
def main(argv: list[str] | None = None) -> int:
    a = parse_params(EvaluateParams, parser().parse_args(argv))
    from tasks.export import ExportNotFound, open_export

    try:  # a user's mistake is one line, before any flow starts
        store = open_storage(a.storage)
        Registry(store).resolve("classifier", a.model, setting="--model")
        open_export(store, a.dataset)
    except (RegistryError, ExportNotFound) as exc:
        print(f"carflow evaluate: {exc}", file=sys.stderr)
        return 2
    try:
        out = evaluate(a)
    except (RegistryError, ExportNotFound, EvaluationError) as exc:
        print(f"carflow evaluate: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(out, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
