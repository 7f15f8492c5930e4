"""Ingest flow: listing feeds (+ optional folder dataset import) → manifest v0.

    python -m flows.ingest                         # all listing feeds in the configured storage
    python -m flows.ingest --folders PATH|s3://…   # import a seed-style folder dataset first
    carflow ingest PATH --layout folders           # the same through the CLI
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections import Counter

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from carflow.caching import shards
from carflow.errors import UserError
from carflow.manifest import INGEST_SCHEMA, REJECTS_SCHEMA, manifest_key, write_manifest
from carflow.settings import get_settings
from carflow.storage import open_storage
from flows.entry import entry_point
from tasks.ingest import (
    build_manifest,
    check_folder_dataset,
    import_folder_shard_task,
    list_folder_dataset,
    parse_folder_key,
    read_listing_feeds_task,
    write_listing_records,
)


def _storage_uri(storage: str | None) -> str | None:
    return storage  # None → settings default inside each task (pickle-friendly)


@flow(name="ingest", log_prints=True)
def ingest(
    storage: str | None = None,
    sites: list[str] | None = None,
    folders: str | None = None,
    site: str = "import",
    listing_regex: str | None = None,
    label_regex: str | None = None,
) -> dict:
    """Build ``manifests/ingest/manifest.parquet`` from every listing feed in ``storage``.

    With ``folders`` (a local path or ``s3://`` prefix in the seeds' class-folder
    layout), its photos are first stored content-addressed and saved as a listing feed
    of site ``site``, so later runs need not read the folder again.
    """
    logger = get_run_logger()
    cfg = get_settings()
    store = open_storage(storage)
    stats: Counter = Counter()

    if folders:
        listing_regex = listing_regex or cfg.ingest.listing_regex
        label_regex = label_regex or cfg.ingest.label_regex
        source = check_folder_dataset(folders)
        keys, list_stats = list_folder_dataset(source, cfg.ingest.image_extensions)
        if not keys:
            raise UserError(
                f"no image files ({', '.join(cfg.ingest.image_extensions)}) in class folders under "
                f"{source.uri()}: expected <class>/<listing>_<photo>_<id>.jpg ({dict(list_stats) or 'empty'})"
            )
        stats.update(list_stats)
        # shard by listing, so that no listing is split across two feed parts
        groups: dict[str, list[str]] = {}
        for key in keys:
            groups.setdefault(parse_folder_key(key, site, listing_regex, label_regex)["listing_id"], []).append(key)
        per_shard = max(1, cfg.ingest.shard_size)
        batches: list[list[str]] = []
        for group in shards(sorted(groups), max(1, per_shard // 4)):
            batches.append([k for lid in group for k in groups[lid]])
        futures = [
            import_folder_shard_task.submit(folders, batch, storage, site, listing_regex, label_regex)
            for batch in batches
        ]
        import_id = "import-" + hashlib.sha256(json.dumps([source.uri(), keys]).encode()).hexdigest()[:12]
        for part, fut in enumerate(futures):
            records, shard_stats = fut.result()
            stats.update({f"import:{k}": v for k, v in shard_stats.items()})
            write_listing_records(store, site, import_id, records, part)
        logger.info("imported %d files from %s as site %r", len(keys), source.uri(), site)

    if sites and folders and site not in sites:
        sites = [*sites, site]
    records, feed_stats = read_listing_feeds_task(storage, sites)
    stats.update(feed_stats)
    manifest, rejects, build_stats = build_manifest(records)
    stats.update(build_stats)
    prefix = cfg.runtime.manifests_prefix
    manifest_uri = write_manifest(store, manifest_key("ingest", prefix=prefix), manifest, INGEST_SCHEMA)
    rejects_uri = write_manifest(store, manifest_key("ingest", "rejects", prefix=prefix), rejects, REJECTS_SCHEMA)

    reasons = Counter(rejects.column("reason").to_pylist()) if rejects.num_rows else Counter()
    summary = {
        "manifest": manifest_uri,
        "rejects": rejects_uri,
        "rows": manifest.num_rows,
        "images": build_stats["images"],
        "listings": build_stats["listings"],
        "labelled_listings": build_stats["listings"] - build_stats["listing_missing_label"],
        "labels": len({x for x in manifest.column("label").to_pylist() if x}),
        "rejected_refs": rejects.num_rows,
        "rejected_by_reason": dict(sorted(reasons.items())),
        "stats": dict(sorted(stats.items())),
    }
    create_table_artifact(
        key="ingest-counts",
        table=[{"count": k, "value": v} for k, v in summary.items() if isinstance(v, int)]
        + [{"count": f"rejected:{k}", "value": v} for k, v in summary["rejected_by_reason"].items()],
        description="Ingest: manifest v0 counts",
    )
    create_markdown_artifact(
        key="ingest-manifest",
        markdown=f"**Manifest v0**: `{manifest_uri}` ({manifest.num_rows} rows, "
        f"{summary['images']} images, {summary['listings']} listings)\n\n**Rejected photo refs**: `{rejects_uri}`",
    )
    logger.info("manifest %s: %d rows, %d images, %d listings", manifest_uri, manifest.num_rows,
                summary["images"], summary["listings"])
    return summary


@entry_point
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.ingest", description=ingest.__doc__)
    parser.add_argument("path", nargs="?", help="a seed-style class-folder dataset to import (path or s3://)")
    parser.add_argument("--layout", choices=["crawl", "folders"], default="crawl",
                        help="crawl: read the listing feeds in storage; folders: import PATH first")
    parser.add_argument("--storage", help="storage URI (default: settings storage)")
    parser.add_argument("--site", action="append", dest="sites", help="only these sites' feeds (repeatable)")
    parser.add_argument("--folders", help="same as PATH with --layout folders")
    parser.add_argument("--import-site", default="import", help="site name for imported folders")
    args = parser.parse_args(argv)
    if args.path and args.layout != "folders":
        parser.error("PATH needs --layout folders (crawl feeds are read from storage)")
    args.folders = args.folders or args.path
    if args.folders:
        check_folder_dataset(args.folders)  # a typo is one line, before any flow run
    summary = ingest(storage=args.storage, sites=args.sites, folders=args.folders, site=args.import_site)
    print(json.dumps({k: v for k, v in summary.items() if k != "stats"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
