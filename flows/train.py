"""Train flow: the latest dataset export → a registered, evaluated make/model classifier.

    python -m flows.train [--backbone efficientnetb1|resnet50v2|mobilenetv2] [--epochs N]
                          [--image-size PX] [--weights imagenet|none|PATH] [--cv K] ...
    carflow train  (the same flags)

Every flag is a field of one pydantic model, :data:`TrainParams`: the ``train`` settings
section (each flag overrides ``train.<name>`` / ``CARFLOW_TRAIN__<NAME>``; unset = the
settings) plus ``--storage``, ``--no-evaluate`` and ``--force``. Prefect's UI shows the
same model as the deployment's form.

Wiring only: ``tasks.train.train_task`` trains (one line per epoch with the metrics and
an ETA; a Prefect progress artifact; a checkpoint per epoch, so a retried or restarted
run resumes) and registers the version; ``tasks.evaluate`` evaluates it (report, plots,
galleries, temperature) and runs champion/challenger (``latest`` moves only when the new
test top-1 is at least the current one's on the same test split, or with ``--force``).
It ends by printing where the model, the report and the galleries are.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Optional

from prefect import get_run_logger
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    update_progress_artifact,
)
from pydantic import BaseModel, Field, create_model

from carflow.settings import TrainSettings, get_settings
from flows.entry import entry_point
from flows.params import (
    FlowParams,
    UsageError,
    make_parser,
    params_flow,
    parse_params,
    storage_field,
)

#: flow options that are not training settings
FLOW_FIELDS: dict[str, Any] = {
    "storage": (Optional[str], storage_field()),  # noqa: UP045
    "evaluate": (bool, Field(True, description="evaluate the new version and run champion/challenger")),
    "force": (bool, Field(False, description="move latest to the new version whatever the numbers")),
}

#: the one parameter model: the flags of `python -m flows.train` / `carflow train` and the Prefect form
TrainParams: type[BaseModel] = create_model(  # type: ignore[call-overload]
    "TrainParams",
    __base__=FlowParams,
    __doc__="Training parameters: every `train` setting (None = the settings' value) plus the flow's options.",
    **FLOW_FIELDS,
    **{name: (Optional[f.annotation], Field(None, description=f"train.{name} (default: {f.default!r})"))  # noqa: UP045
       for name, f in TrainSettings.model_fields.items()},
)


def settings_from(params: BaseModel) -> TrainSettings:
    """The ``train`` settings with the parameters that were given laid over them."""
    given = {k: v for k, v in params.model_dump().items() if k in TrainSettings.model_fields and v is not None}
    return TrainSettings(**{**get_settings().train.model_dump(), **given})


def _progress_hook() -> Any:
    try:
        artifact_id = create_progress_artifact(0.0, key="train-progress", description="classifier training")
    except Exception:  # noqa: BLE001 - no API: the epoch lines still show progress
        return None

    def hook(fraction: float, _line: str) -> None:
        try:
            update_progress_artifact(artifact_id, round(100 * fraction, 1))
        except Exception:  # noqa: BLE001
            pass

    return hook


@params_flow(name="train", log_prints=True)
def train(params: TrainParams = TrainParams(), argv: list[str] | None = None) -> dict[str, Any]:  # type: ignore[valid-type]
    """Train a classifier on the latest dataset export (or ``dataset``), register it,
    evaluate it and run champion/challenger."""
    from tasks.train import train_task

    logger = get_run_logger()
    cfg = settings_from(params)
    out = train_task(params.storage, cfg.model_dump(mode="json"), argv, _progress_hook())
    result: dict[str, Any] = {k: out[k] for k in ("version", "folder", "model", "task", "dataset_version", "epochs",
                                                   "resumed_from_epoch", "test", "export", "cv", "runtime",
                                                   "tensorboard", "seconds")}
    if params.evaluate:
        from tasks.evaluate import evaluate_version_task, promote_task

        config = get_settings().evaluate.model_dump(mode="json")
        summary = evaluate_version_task(params.storage, out["version"], out["dataset_version"], config, True)
        result["evaluation"] = {k: summary.get(k) for k in ("top1", "top5", "macro_f1", "binary_accuracy",
                                                            "ece_before", "ece_after", "temperature", "n_test")}
        result["files"] = summary.get("files", {})
        result["promotion"] = promote_task(params.storage, out["version"], params.force, config)
    lines = result["where"] = where(result)
    create_markdown_artifact(key="train-summary", markdown="## Classifier " + out["version"] + "\n\n" +
                             "\n".join(f"- {ln}" for ln in lines))
    logger.info("trained %s", out["version"])
    for ln in lines:
        print(ln)
    return result


def where(result: dict[str, Any]) -> list[str]:
    """The closing lines: where the model, the report and the galleries are."""
    lines = [f"model: {result['folder']} (version {result['version']})"]
    test = result.get("test") or {}
    if "top1" in test:
        lines.append(f"test top-1 {test['top1']:.4f}, top-5 {test.get('top5', 0):.4f} on {test['n']} images")
    elif "binary_accuracy" in test:
        lines.append(f"test binary accuracy {test['binary_accuracy']:.4f} on {test['n']} images")
    if result.get("cv"):
        cv = result["cv"]
        lines.append(f"cross-validation: {cv['metric']} mean {cv['mean']:.4f} ± {cv['std']:.4f}, "
                     f"best fold {cv['best_fold']} ({cv['best']:.4f})")
    files = result.get("files") or {}
    if "report.md" in files:
        lines.append(f"report: {files['report.md']}")
    galleries = [v for k, v in files.items() if k.endswith(".png")]
    if galleries:
        lines.append("plots and galleries: " + ", ".join(galleries))
    if result.get("promotion"):
        p = result["promotion"]
        lines.append(f"latest: {'moved to this version' if p.get('promoted') else 'unchanged'} ({p.get('reason')})")
    lines.append(f"tensorboard: {result['tensorboard']}")
    return lines


# ---------------------------------------------------------------------------------------
# the command line, from the same model
# ---------------------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    """``--<field>`` for every field of :data:`TrainParams` (underscores as dashes)."""
    return make_parser("python -m flows.train", train.__doc__, TrainParams)


@entry_point
def main(argv: list[str] | None = None) -> int:
    from carflow.settings import SettingsError
    from models.classifier import WeightsError
    from tasks.export import ExportNotFound
    from tasks.train import TrainError

    args = list(sys.argv[1:] if argv is None else argv)
    try:
        params = parse_params(TrainParams, parser().parse_args(args))  # a bad flag: one line naming it
        cfg = settings_from(params)  # an invalid combination is one line, before any flow starts
    except UsageError as exc:
        print(f"carflow train: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - pydantic's ValidationError names the field
        print(f"carflow train: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    try:
        from tasks.export import open_export

        open_export(params.storage, cfg.dataset)
    except ExportNotFound as exc:
        print(f"carflow train: {exc}", file=sys.stderr)
        return 2
    try:
        out = train(params, argv=["carflow", "train", *args])
    except (ExportNotFound, TrainError, SettingsError, WeightsError) as exc:
        print(f"carflow train: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in out.items() if k != "history"}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
