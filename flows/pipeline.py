"""The nightly DAG: crawl every site → ingest → clean → car filter → crop → dataset.

    python -m flows.pipeline [--sites demo ...] [--storage URI] [--min-images N]

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
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from prefect import flow, get_run_logger

from carflow.lock import storage_locked
from carflow.settings import get_settings
from flows.car_filter import score
from flows.clean import clean
from flows.crawl import crawl
from flows.crop import crop
from flows.dataset import dataset
from flows.entry import entry_point
from flows.ingest import ingest
from tasks.stages import (
    MODEL_STAGES,
    check_car_filter_model,
    check_crop_weights,
    passthrough,
)


def run_car_filter(storage: str | None, model: str | None = None, enabled: bool | None = None) -> dict[str, Any]:
    """The car filter stage of the DAG: score the clean manifest, or pass it through."""
    enabled = get_settings().car_filter.enabled if enabled is None else enabled
    if not enabled:
        return passthrough(storage, "car_filter", MODEL_STAGES["car_filter"])
    return {"enabled": True, **score(storage=storage, model=model)}


def run_crop(storage: str | None, weights: str | None = None, imgsz: int | None = None,
             conf: float | None = None, enabled: bool | None = None) -> dict[str, Any]:
    """The crop stage of the DAG, reading the car filter stage's manifest (explicitly)."""
    enabled = get_settings().crop.enabled if enabled is None else enabled
    if not enabled:
        return passthrough(storage, "crop", MODEL_STAGES["crop"])
    return {"enabled": True, **crop(storage=storage, source=MODEL_STAGES["crop"], weights=weights, imgsz=imgsz,
                                    conf=conf)}


def stage_counts(summary: dict[str, Any]) -> str:
    """One line of a stage summary: kept + dropped per reason (or ``off``)."""
    if summary.get("enabled") is False:
        return f"off (pass-through of {summary['input']})"
    return f"kept={summary['kept']} dropped={summary.get('dropped_by_reason', {})}"


@flow(name="nightly", log_prints=True)
@storage_locked("pipeline")  # one nightly at a time per storage: a second one waits (runtime.lock_wait_s)
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
        logger.info("crop: weights %s", check_crop_weights(storage=storage))
    else:
        logger.warning("crop.enabled is false: the crop stage passes its input through; the dataset is built "
                       "from uncropped photos")
    crawls = {site: crawl(site=site, storage=storage, base_url=(base_urls or {}).get(site)) for site in sites}
    summary = ingest(storage=storage)
    cleaned = clean(storage=storage)
    filtered = run_car_filter(storage, model=chosen["model"] if chosen else None)
    cropped = run_crop(storage)
    data = dataset(storage=storage, min_images=min_images, source="crop")
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
