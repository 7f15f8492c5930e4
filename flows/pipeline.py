"""The nightly DAG: crawl every site → ingest → clean → car filter → crop → dataset.

    python -m flows.pipeline [--sites demo ...] [--storage URI] [--min-images N]

The car filter scores with ``car_filter.model`` (default: the latest version trained into
``car_filter.models_prefix`` of the storage) and the crop stage detects with
``crop.weights``. Both are checked before the crawl starts: a missing model fails the run
at once, naming the setting and how to make one, instead of after hours of crawling.

A team without a model yet turns a stage off (``car_filter.enabled`` /
``crop.enabled``, ``CARFLOW_CAR_FILTER__ENABLED=false`` / ``CARFLOW_CROP__ENABLED=false``).
A stage that is off still writes its manifest, as its input unchanged (a *pass-through*,
marked in the Parquet metadata under ``carflow.passthrough``), so the next stage never
reads a stale manifest left by an earlier run with the stage on: the dataset is always
built from this run's chain. The crop stage is told its input explicitly.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from prefect import flow, get_run_logger, task

from carflow.manifest import KEPT, manifest_key, read_manifest, write_manifest
from carflow.settings import SettingsError, get_settings
from carflow.storage import open_storage
from flows.car_filter import score
from flows.clean import clean
from flows.crawl import crawl
from flows.crop import crop
from flows.dataset import dataset
from flows.entry import entry_point
from flows.ingest import ingest

#: the model stages in DAG order, and the stage each one reads
MODEL_STAGES = {"car_filter": "clean", "crop": "car_filter"}
PASSTHROUGH_META = b"carflow.passthrough"


class StageNotReady(SettingsError):
    """An enabled stage has no model to run with; the message names the setting."""


def check_car_filter_model(storage: str | None, model: str | None = None) -> dict[str, Any]:
    """The car filter model the stage will score with (``resolve_model``), checked to
    exist. Raises :class:`StageNotReady` naming ``car_filter.model`` / ``car_filter.enabled``
    and the commands that make a model."""
    from tasks.car_filter import resolve_model

    cfg = get_settings().car_filter
    store = open_storage(storage)
    fix = (
        "Make one: run the pipeline once with the stage off to get a clean manifest, then "
        "`python -m flows.car_filter kit` (a labelling kit: labels.csv + thumbnails), fill in "
        "car / no_car, and `python -m flows.car_filter train --labels <labels.csv>`; or set "
        "car_filter.model [CARFLOW_CAR_FILTER__MODEL] to a trained version; or turn the stage off: "
        "car_filter.enabled=false [CARFLOW_CAR_FILTER__ENABLED=false]."
    )
    try:
        chosen = resolve_model(store, cfg, model)
    except FileNotFoundError:
        where = store.uri(f"{cfg.models_prefix.rstrip('/')}/latest.json")
        raise StageNotReady(
            f"car_filter.enabled is true but there is no car filter model: car_filter.model "
            f"[CARFLOW_CAR_FILTER__MODEL] is not set and {where} does not exist. {fix}"
        ) from None
    head, _, name = chosen["model"].rpartition("/")
    if not open_storage(head).exists(name):
        raise StageNotReady(f"car_filter.model [CARFLOW_CAR_FILTER__MODEL]: {chosen['model']} does not exist. {fix}")
    return chosen


def check_crop_weights(weights: str | None = None) -> str:
    """``crop.weights`` (or ``weights``) resolved without loading a model; a missing file
    raises the detector's error naming ``crop.weights`` [CARFLOW_CROP__WEIGHTS]."""
    from tasks.detector_train import check_weights

    spec = weights or get_settings().crop.weights
    try:
        check_weights(spec)
    except SettingsError as exc:
        raise StageNotReady(
            f"{exc}. Fine-tune one (`python -m flows.crop train --data data.yaml`) or turn the stage off: "
            "crop.enabled=false [CARFLOW_CROP__ENABLED=false]."
        ) from None
    return spec


@task(name="passthrough-manifest")
def passthrough(storage: str | None, stage: str, source: str) -> dict[str, Any]:
    """A stage that is off: ``manifests/<stage>/manifest.parquet`` = the ``source`` stage's
    manifest, unchanged, with ``carflow.passthrough`` in its Parquet metadata."""
    store = open_storage(storage)
    prefix = get_settings().runtime.manifests_prefix
    src = manifest_key(source, prefix=prefix)
    table = read_manifest(store, src)
    meta = dict(table.schema.metadata or {})
    meta[PASSTHROUGH_META] = json.dumps({"stage": stage, "input": src, "reason": f"{stage}.enabled is false"}).encode()
    uri = write_manifest(store, manifest_key(stage, prefix=prefix), table.replace_schema_metadata(meta))
    status = table.column("status").to_pylist()
    return {"manifest": uri, "input": store.uri(src), "enabled": False, "rows": table.num_rows,
            "kept": sum(s == KEPT for s in status), "dropped_by_reason": {}}


def passthrough_of(store, stage: str) -> dict[str, Any] | None:
    """The pass-through record of ``stage``'s manifest (``{"stage", "input", "reason"}``),
    or ``None`` when the stage really ran."""
    import io

    import pyarrow.parquet as pq

    key = manifest_key(stage, prefix=_prefix())
    meta = pq.ParquetFile(io.BytesIO(store.get(key))).schema_arrow.metadata or {}
    raw = meta.get(PASSTHROUGH_META)
    return json.loads(raw) if raw else None


def run_car_filter(storage: str | None, model: str | None = None, enabled: bool | None = None) -> dict[str, Any]:
    """The car filter stage of the DAG: score the clean manifest, or pass it through."""
    enabled = get_settings().car_filter.enabled if enabled is None else enabled
    if not enabled:
        return passthrough(storage, "car_filter", MODEL_STAGES["car_filter"])
    return {"enabled": True, "input": open_storage(storage).uri(manifest_key("clean", prefix=_prefix())),
            **score(storage=storage, model=model)}


def run_crop(storage: str | None, weights: str | None = None, imgsz: int | None = None,
             conf: float | None = None, enabled: bool | None = None) -> dict[str, Any]:
    """The crop stage of the DAG, reading the car filter stage's manifest (explicitly)."""
    enabled = get_settings().crop.enabled if enabled is None else enabled
    if not enabled:
        return passthrough(storage, "crop", MODEL_STAGES["crop"])
    return {"enabled": True, **crop(storage=storage, source=MODEL_STAGES["crop"], weights=weights, imgsz=imgsz,
                                    conf=conf)}


def _prefix() -> str:
    return get_settings().runtime.manifests_prefix


def stage_counts(summary: dict[str, Any]) -> str:
    """One line of a stage summary: kept + dropped per reason (or ``off``)."""
    if summary.get("enabled") is False:
        return f"off (pass-through of {summary['input']})"
    return f"kept={summary['kept']} dropped={summary.get('dropped_by_reason', {})}"


@flow(name="nightly", log_prints=True)
def nightly(
    sites: list[str] | None = None,
    storage: str | None = None,
    base_urls: dict[str, str] | None = None,
    car_filter_model: str | None = None,
    min_images: int | None = None,
) -> dict:
    """Crawl each site profile (as a subflow), rebuild manifest v0 from all feeds, clean it,
    drop non-car photos (car filter), crop the largest vehicle (YOLO), then assign classes
    and splits (assigned listings never move between runs) on the crops."""
    logger = get_run_logger()
    cfg = get_settings()
    sites = sites or ["demo"]
    # fail before the crawl, not after it, when a stage has no model
    chosen = None
    if cfg.car_filter.enabled:
        chosen = check_car_filter_model(storage, car_filter_model)
        logger.info("car filter: model %s", chosen["model"])
    else:
        logger.warning("car_filter.enabled is false: the car filter stage passes the clean manifest through")
    if cfg.crop.enabled:
        logger.info("crop: weights %s", check_crop_weights())
    else:
        logger.warning("crop.enabled is false: the crop stage passes its input through; the dataset is built "
                       "from uncropped photos")
    crawls = {site: crawl(site=site, storage=storage, base_url=(base_urls or {}).get(site)) for site in sites}
    summary = ingest(storage=storage)
    cleaned = clean(storage=storage)
    filtered = run_car_filter(storage, model=chosen["model"] if chosen else None)
    cropped = run_crop(storage)
    data = dataset(storage=storage, min_images=min_images)
    for name, s in (("car_filter", filtered), ("crop", cropped)):
        logger.info("%s: %s", name, stage_counts(s))
    return {"crawls": {s: st.get("crawl_id") for s, st in crawls.items()}, "ingest": summary, "clean": cleaned,
            "car_filter": filtered, "crop": cropped, "dataset": data}


@entry_point
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.pipeline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", nargs="*", default=["demo"])
    parser.add_argument("--storage", help="storage URI (default: settings storage)")
    parser.add_argument("--car-filter-model", help="car_filter.model (default: latest trained)")
    parser.add_argument("--min-images", type=int, help="classes.min_images")
    a = parser.parse_args(argv)
    result = nightly(a.sites, a.storage, None, a.car_filter_model, a.min_images)
    print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
