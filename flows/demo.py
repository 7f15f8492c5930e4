"""The demo job (`make demo`): generate the demo marketplace, serve it on loopback, crawl
it into storage, build manifest v0 (checked against the ground truth), clean it
(fix → quality → dedup), then build the dataset (classes → grouped split).

    python -m flows.demo [--listings 60] [--classes 6] [--seed 0] [--storage PATH|s3://…]
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task

from carflow.demo_site.truth import compare, expected_ingest, load_ground_truth
from carflow.storage import open_storage
from flows.clean import clean
from flows.crawl import crawl
from flows.dataset import dataset
from flows.ingest import ingest


@task(name="generate-demo-site")
def generate_demo_site(out_dir: str, seed: int, listings: int, classes: int) -> str:
    from carflow.demo_site.generate import generate_site

    generate_site(out_dir, seed=seed, n_listings=listings, n_classes=classes)
    return out_dir


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


@flow(name="demo", log_prints=True)
def demo(
    workdir: str = "demo-run",
    seed: int = 0,
    listings: int = 60,
    classes: int = 6,
    storage: str | None = None,
    port: int = 8765,
    min_images: int = 20,
) -> dict[str, Any]:
    """Demo marketplace → crawl → manifest v0, checked against the ground truth."""
    from carflow.demo_site.server import DemoSite

    logger = get_run_logger()
    site_dir = str(Path(workdir) / f"site-seed{seed}-{listings}x{classes}")
    generate_demo_site(site_dir, seed, listings, classes)
    # a fixed port keeps photo URLs stable between demo runs, so a re-run downloads nothing
    with DemoSite(site_dir, port=port if _port_free(port) else 0) as site:
        logger.info("demo marketplace at %s", site.url)
        crawl_stats = crawl(site="demo", storage=storage, base_url=site.url)
    summary = ingest(storage=storage, sites=["demo"])
    cleaned = clean(storage=storage)
    # the demo site is small: a class needs min_images kept photos (the seeds used 150)
    data = dataset(storage=storage, min_images=min_images)
    expected = expected_ingest(load_ground_truth(site_dir))
    mismatches = compare(expected, summary)
    result = {
        "storage": open_storage(storage).uri(),
        "manifest": summary["manifest"],
        "rejects": summary["rejects"],
        "listings": summary["listings"],
        "rows": summary["rows"],
        "images": summary["images"],
        "rejected_by_reason": summary["rejected_by_reason"],
        "crawl_id": crawl_stats.get("crawl_id"),
        "downloaded_photos": crawl_stats.get("carflow/photo/stored", 0),
        "clean_manifest": cleaned["manifest"],
        "clean_kept": cleaned["kept"],
        "clean_dropped_by_reason": cleaned["dropped_by_reason"],
        "contact_sheets": cleaned["contact_sheets"],
        "dataset_manifest": data["manifest"],
        "classes_json": data["classes_json"],
        "classes": data["classes"],
        "per_split": data["per_split"],
        "split_chart": data["chart"],
        "matches_ground_truth": not mismatches,
        "mismatches": {k: {"expected": e, "observed": o} for k, (e, o) in mismatches.items()},
    }
    if mismatches:
        logger.warning("manifest counts differ from the ground truth: %s", result["mismatches"])
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.demo", description=demo.__doc__)
    parser.add_argument("--workdir", default="demo-run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--listings", type=int, default=60)
    parser.add_argument("--classes", type=int, default=6)
    parser.add_argument("--storage", help="storage URI (default: settings storage, ./data)")
    parser.add_argument("--port", type=int, default=8765)
    a = parser.parse_args(argv)
    result = demo(a.workdir, a.seed, a.listings, a.classes, a.storage, a.port)
    print(json.dumps(result, indent=2))
    print(f"\nmanifest: {result['manifest']}")
    print(f"rows={result['rows']} images={result['images']} listings={result['listings']} "
          f"rejected={sum(result['rejected_by_reason'].values())} "
          f"ground truth: {'MATCH' if result['matches_ground_truth'] else 'MISMATCH'}")
    print(f"clean manifest: {result['clean_manifest']}")
    print(f"kept={result['clean_kept']} dropped={result['clean_dropped_by_reason']}")
    print(f"dataset manifest: {result['dataset_manifest']}")
    print(f"classes ({len(result['classes'])}): {', '.join(result['classes'])}; per split: {result['per_split']}")
    return 0 if result["matches_ground_truth"] else 1


if __name__ == "__main__":
    sys.exit(main())
