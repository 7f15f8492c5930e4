"""The nightly DAG: crawl every site → ingest → clean → car filter → crop → dataset →
train → evaluate → promote.

    python -m flows.pipeline [--sites demo ...] [--storage URI] [--min-images N]
                             [--train auto|on|off] [--refresh STAGE ...] ...

Parameters: one pydantic model, :class:`NightlyParams` (defaults and a description on
every field: the Prefect UI's form for the ``nightly`` deployment, and the flags above).

The car filter scores with ``car_filter.model`` (default: the registry's ``latest`` car
filter in the storage) and the crop stage detects with ``crop.weights`` (``latest``: the
registry's latest fine-tuned detector). Both are checked before the crawl starts: a missing model fails the run
at once, naming the setting and how to make one, instead of after hours of crawling.

A team without a model yet turns a stage off (``car_filter.enabled`` /
``crop.enabled``, ``CARFLOW_CAR_FILTER__ENABLED=false`` / ``CARFLOW_CROP__ENABLED=false``).
A stage that is off still writes its manifest, as its input unchanged (a *pass-through*,
marked in the Parquet metadata under ``carflow.passthrough``), so the next stage never
reads a stale manifest left by an earlier run with the stage on: the dataset is always
built from this run's chain. Each stage is told its input explicitly, and every manifest
records its input's key and content hash (its lineage). The fail-fast checks and the
pass-through are :mod:`tasks.stages`; :func:`run_car_filter` / :func:`run_crop` are the
wiring the demo reuses.

Training is decided from the **dataset version** (a content hash of the class list and
of the rows the export holds, :func:`tasks.classes.with_dataset_version`), never the
clock: with ``train=auto`` (default) a night whose dataset version already has a
trained classifier trains nothing (:func:`tasks.nightly.train_decision`). A new version
runs the ``train`` flow (the ``train`` settings), which evaluates the model and runs
champion/challenger: ``latest`` moves only when the challenger's test top-1 is at least
the champion's. Every stage's shards are content-keyed in the storage, so an unchanged
night decodes nothing and infers nothing; ``refresh`` recomputes a stage's shards (its own ``refresh``).
The run ends with a markdown summary (the funnel of images per stage, the drops per
stage and reason, links to the evaluation report): the ``nightly-summary`` artifact and
``runs/<run>/summary.md`` in the storage (:mod:`tasks.nightly`).
"""

from __future__ import annotations

import json
import sys
from datetime import datetime, timezone
from typing import Annotated, Any, Literal, Optional

from prefect import get_run_logger
from pydantic import Field, field_validator

from carflow.lock import storage_locked
from carflow.settings import get_settings
from flows.car_filter import score
from flows.clean import clean
from flows.crawl import crawl
from flows.crop import crop
from flows.dataset import dataset
from flows.entry import entry_point
from flows.ingest import ingest
from flows.params import Flag, FlowParams, make_parser, params_flow, parse_params, storage_field
from flows.train import TrainParams
from flows.train import train as train_flow
from tasks.nightly import (
    classifier_summary,
    publish_run_summary,
    train_decision,
    trained_on,
)
from tasks.stages import (
    MODEL_STAGES,
    check_car_filter_model,
    check_crop_weights,
    passthrough,
)


def run_car_filter(storage: str | None, model: str | None = None, enabled: bool | None = None,
                   refresh: bool = False) -> dict[str, Any]:
    """The car filter stage of the DAG: score the clean manifest, or pass it through."""
    enabled = get_settings().car_filter.enabled if enabled is None else enabled
    if not enabled:
        return passthrough(storage, "car_filter", MODEL_STAGES["car_filter"])
    return {"enabled": True, **score(storage=storage, model=model, refresh=refresh)}


def run_crop(storage: str | None, weights: str | None = None, imgsz: int | None = None,
             conf: float | None = None, enabled: bool | None = None, refresh: bool = False) -> dict[str, Any]:
    """The crop stage of the DAG, reading the car filter stage's manifest (explicitly)."""
    enabled = get_settings().crop.enabled if enabled is None else enabled
    if not enabled:
        return passthrough(storage, "crop", MODEL_STAGES["crop"])
    return {"enabled": True, **crop(storage=storage, source=MODEL_STAGES["crop"], weights=weights, imgsz=imgsz,
                                    conf=conf, refresh=refresh)}


def stage_counts(summary: dict[str, Any]) -> str:
    """One line of a stage summary: kept + dropped per reason (or ``off``)."""
    if summary.get("enabled") is False:
        return f"off (pass-through of {summary['input']})"
    return f"kept={summary['kept']} dropped={summary.get('dropped_by_reason', {})}"


#: stages whose stored results ``refresh`` recomputes (the stage's own ``refresh``; ``train``: trains again)
REFRESHABLE = ("clean", "car_filter", "crop", "train")


class NightlyParams(FlowParams):
    """The nightly run's parameters (the Prefect UI's form; ``python -m flows.pipeline`` flags)."""

    sites: list[str] = Field(["demo"], min_length=1,
                             description="site profiles to crawl (spiders/sites/<name>.yaml), one crawl subflow each")
    storage: Optional[str] = storage_field()  # noqa: UP045
    base_urls: Annotated[dict[str, str], Flag(name="--base-url", action="append", metavar="SITE=URL")] = Field(
        default_factory=dict, description="site → base URL overriding the profile's (a mirror, a test site)")
    car_filter_model: Optional[str] = Field(  # noqa: UP045
        None, description="car filter model: latest, a version, a path or s3:// URI (default: car_filter.model)")
    min_images: Optional[int] = Field(  # noqa: UP045
        None, ge=1, description="a class needs this many kept images (default: classes.min_images)")
    train: Literal["auto", "on", "off"] = Field(
        "auto", description="auto: train only when the dataset version has no trained classifier yet; "
                            "on: always; off: stop after the dataset")
    force_promote: bool = Field(False, description="move the classifier's latest to the new model whatever its "
                                                   "test top-1 (default: champion/challenger)")
    refresh: list[Literal["clean", "car_filter", "crop", "train"]] = Field(
        default_factory=list, description="stages to recompute although their results are stored "
                                          "(each stage's refresh: its shards recomputed and rewritten; train: trains again)")
    tfrecord_size: Optional[int] = Field(  # noqa: UP045
        None, ge=16, description="image size of the TFRecord export training reads (default: split.tfrecord_size, "
                                 "else train.image_size)")

    @field_validator("base_urls", mode="before")
    @classmethod
    def _site_equals_url(cls, value: Any) -> Any:
        """``--base-url demo=http://…`` (repeatable) as well as a mapping."""
        if isinstance(value, (list, tuple)):
            pairs = [str(v).split("=", 1) for v in value]
            bad = [v for v, p in zip(value, pairs, strict=True) if len(p) != 2 or not p[0]]
            if bad:
                raise ValueError(f"expected SITE=URL, got {bad[0]!r}")
            return dict(pairs)
        return value


@params_flow(name="nightly", log_prints=True)
@storage_locked("pipeline")  # one nightly at a time per storage: a second one waits (runtime.lock_wait_s)
def nightly(params: NightlyParams = NightlyParams()) -> dict[str, Any]:
    """Crawl each site profile (as a subflow), rebuild manifest v0 from all feeds, clean it,
    drop non-car photos (car filter), crop the largest vehicle (YOLO), assign classes and
    splits (assigned listings never move between runs) on the crops and export them; then,
    when the dataset version is new, train, evaluate and promote (champion/challenger)."""
    logger = get_run_logger()
    cfg = get_settings()
    storage = params.storage
    run = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    # fail before the crawl, not after it, when a stage has no model
    chosen = None
    if cfg.car_filter.enabled:
        chosen = check_car_filter_model(storage, params.car_filter_model)
        logger.info("car filter: model %s", chosen["model"])
    else:
        logger.warning("car_filter.enabled is false: the car filter stage passes the clean manifest through")
    if cfg.crop.enabled:
        logger.info("crop: weights %s", check_crop_weights(storage=storage))
    else:
        logger.warning("crop.enabled is false: the crop stage passes its input through; the dataset is built "
                       "from uncropped photos")
    crawls = {site: crawl(site=site, storage=storage, base_url=params.base_urls.get(site)) for site in params.sites}
    summary = ingest(storage=storage)
    cleaned = clean(storage=storage, refresh="clean" in params.refresh)
    filtered = run_car_filter(storage, model=chosen["model"] if chosen else None,
                              refresh="car_filter" in params.refresh)
    cropped = run_crop(storage, refresh="crop" in params.refresh)
    data = dataset(storage=storage, min_images=params.min_images, source="crop", run=run,
                   tfrecord=True if params.train != "off" else None, tfrecord_size=params.tfrecord_size)
    for name, s in (("car_filter", filtered), ("crop", cropped)):
        logger.info("%s: %s", name, stage_counts(s))

    mode = "on" if "train" in params.refresh else params.train
    result = {"run": run, "crawls": {s: st.get("crawl_id") for s, st in crawls.items()}, "ingest": summary,
              "clean": cleaned, "car_filter": filtered, "crop": cropped, "dataset": data,
              "train": train_if_new(storage, data["version"], mode, {"force": params.force_promote})}
    result["summary"] = publish_summary(storage, run, result)
    return result


def train_if_new(storage: str | None, dataset_version: str, mode: str = "auto",
                 overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The train → evaluate → promote step of the DAG: the ``train`` flow (with
    ``overrides`` of :data:`flows.train.TrainParams`) when :func:`tasks.nightly.train_decision`
    says so; either way, what the summary reports on the classifier trained on this dataset
    version (if any): ``trained``, ``reason``, ``version``, ``folder``, ``evaluation``,
    ``promotion``, ``files``."""
    logger = get_run_logger()
    before = trained_on(storage, dataset_version)
    go, why = train_decision(mode, dataset_version, before)
    logger.info("train: %s (%s)", "yes" if go else "skipped", why)
    version = before
    if go:
        out = train_flow(TrainParams(**{"storage": storage, "dataset": dataset_version, **(overrides or {})}))
        version = out["version"]
    info = classifier_summary(storage, version, dataset_version) if version else {}
    return {"trained": go, "reason": why, "dataset_version": dataset_version,
            **{k: v for k, v in info.items() if k != "metrics"}}


def publish_summary(storage: str | None, run: str, result: dict[str, Any], title: str = "Nightly run",
                    artifact_key: str = "nightly-summary") -> dict[str, Any]:
    """The run summary (:func:`tasks.nightly.publish_run_summary`) of a nightly/demo ``result``."""
    train = result.get("train") or {}
    facts = [f"dataset {result['dataset']['version']}: {len(result['dataset']['classes'])} classes, "
             f"per split {result['dataset']['per_split']}",
             f"training: {'trained ' + str(train.get('version')) if train.get('trained') else 'skipped'} "
             f"({train.get('reason')})"]
    links = {"dataset manifest": result["dataset"]["manifest"], "classes.json": result["dataset"]["classes_json"],
             "split chart": result["dataset"].get("chart")}
    if train.get("version"):
        ev = train.get("evaluation") or {}
        if ev.get("top1") is not None:
            facts.append(f"classifier {train['version']}: test top-1 {ev['top1']:.3f}, top-5 {ev.get('top5') or 0:.3f}, "
                         f"macro-F1 {ev.get('macro_f1') or 0:.3f} on {ev.get('n_test')} images")
        p = train.get("promotion") or {}
        if p:
            facts.append(f"champion/challenger: latest {'moved to this version' if p.get('promoted') else 'unchanged'}"
                         f" ({p.get('reason')})")
        links["model"] = train.get("folder")
        links.update({f"evaluation {k}": v for k, v in (train.get("files") or {}).items()
                      if k == "report.md" or k.endswith(".png")})
    out = publish_run_summary(storage, run, title, facts, links, artifact_key=artifact_key)
    print(out["markdown"])
    return {k: out[k] for k in ("funnel", "uri", "json_uri", "counts")}


def parser() -> Any:
    """``python -m flows.pipeline`` flags: one per :class:`NightlyParams` field."""
    return make_parser("python -m flows.pipeline", __doc__, NightlyParams)


@entry_point
def main(argv: list[str] | None = None) -> int:
    params = parse_params(NightlyParams, parser().parse_args(argv))
    result = nightly(params)
    print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
