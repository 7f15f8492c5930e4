"""Ingest flow: listing feeds (+ optional folder dataset import) → manifest v0.

    python -m flows.ingest                         # all listing feeds in the configured storage
    python -m flows.ingest --folders PATH|s3://…   # import a seed-style folder dataset first
    carflow ingest PATH --layout folders           # the same through the CLI
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from typing import Annotated

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from pydantic import Field

from carflow.errors import UserError
from carflow.settings import get_settings
from flows.entry import entry_point
from flows.params import (
    Flag,
    FlowParams,
    make_parser,
    params_flow,
    parse_params,
    storage_field,
)
from tasks.ingest import (
    build_ingest_manifest_task,
    check_folder_dataset,
    folder_import_id,
    import_folder_shard_task,
    list_folder_dataset,
    plan_folder_import,
)
from tasks.shards import submit_bounded


def _storage_uri(storage: str | None) -> str | None:
    return storage  # None → settings default inside each task (pickle-friendly)


class IngestParams(FlowParams):
    """Listing feeds (and optionally a folder dataset) → manifest v0."""

    storage: str | None = storage_field()
    sites: Annotated[list[str] | None, Flag(name="--site", action="append", metavar="SITE")] = Field(
        None, description="only these sites' listing feeds (default: every site; --site is repeatable)")
    folders: str | None = Field(None, description="first import this seed-style class-folder dataset "
                                                  "(a local path or s3:// prefix)")
    site: Annotated[str, Flag(name="--import-site")] = Field(
        "import", description="the site name the imported folder dataset's listings get")
    listing_regex: str | None = Field(None, description="folder import: the listing id in a file name "
                                                        "(default: ingest.listing_regex)")
    label_regex: str | None = Field(None, description="folder import: make/model/year in a class folder's name "
                                                      "(default: ingest.label_regex)")


@params_flow(name="ingest", log_prints=True)
def ingest(params: IngestParams = IngestParams()) -> dict:
    """Build ``manifests/ingest/manifest.parquet`` from every listing feed in ``storage``.

    With ``folders`` (a local path or ``s3://`` prefix in the seeds' class-folder
    layout), its photos are first stored content-addressed and saved as a listing feed
    of site ``site``, so later runs need not read the folder again.
    """
    logger = get_run_logger()
    cfg = get_settings()
    storage, sites, folders, site = params.storage, params.sites, params.folders, params.site
    listing_regex, label_regex = params.listing_regex, params.label_regex
    stats: Counter = Counter()
    report: list[str] = []  # what a person running the import must see (main prints it)

    if folders:
        listing_regex = listing_regex or cfg.ingest.listing_regex
        label_regex = label_regex or cfg.ingest.label_regex
        source = check_folder_dataset(folders)
        keys, list_stats = list_folder_dataset(source)
        if not keys:
            raise UserError(f"no image files in class folders under {source.uri()}: expected "
                            f"<class>/<listing>_<photo>_<id>.jpg ({dict(list_stats) or 'empty'})")
        stats.update(list_stats)
        batches = plan_folder_import(keys, site, listing_regex, label_regex, max(1, cfg.ingest.shard_size))
        import_id, n_keys = folder_import_id(source.uri(), keys), len(keys)
        del keys  # the batches hold them now
        calls = (
            {"source_uri": folders, "keys": batch, "storage_uri": storage, "site": site,
             "listing_regex": listing_regex, "label_regex": label_regex, "import_id": import_id, "part": part,
             "extensions": cfg.ingest.image_extensions}
            for part, batch in enumerate(batches)
        )
        for done in submit_bounded(import_folder_shard_task, calls, cfg.runtime.max_workers,
                                   sizes=[len(batch) for batch in batches]):
            stats.update({f"import:{k}": v for k, v in done["stats"].items()})
        del batches, calls
        skipped = {k.removeprefix("import:").removeprefix("skipped_"): v for k, v in stats.items() if "skipped_" in k}
        imported = stats["import:stored"]
        logger.info("imported %d files from %s as site %r", imported, source.uri(), site)
        files = n_keys + stats["skipped_not_in_class_folder"]
        skips = ", ".join(f"{n} skipped ({why})" for why, n in sorted(skipped.items())) or "none skipped"
        photos = imported + sum(v for k, v in stats.items() if k.startswith("import:rejected:"))
        if not photos:  # every file was skipped: the wrong folder, not a dataset with bad photos
            raise UserError(f"no image files in class folders under {source.uri()}: {files} files, {skips}; "
                            "expected <class>/<listing>_<photo>_<id>.jpg")
        report.append(f"folder import {source.uri()}: {files} files, {imported} photos stored, {skips}")
        if stats["import:label_conflict_listings"]:
            report.append(f"  {stats['import:label_conflict_listings']} listing(s) found in two class folders: "
                          "label_conflict, settled by classes.conflict_policy in the dataset stage")
        for line in report:
            logger.info(line)

    if sites and folders and site not in sites:
        sites = [*sites, site]
    built = build_ingest_manifest_task(storage, sites, cfg.runtime.manifests_prefix)
    stats.update(built["stats"])
    manifest_uri, rejects_uri, reasons = built["manifest"], built["rejects"], built["rejected_by_reason"]
    summary = {
        "manifest": manifest_uri,
        "rejects": rejects_uri,
        "rows": built["rows"],
        "images": stats["images"],
        "listings": stats["listings"],
        "labelled_listings": stats["listings"] - stats["listing_missing_label"],
        "labels": built["labels"],
        "rejected_refs": stats["rejected_refs"],
        "rejected_by_reason": reasons,
        "skipped": {k.removeprefix("import:"): v for k, v in sorted(stats.items()) if "skipped_" in k},
        "label_conflict_listings": stats["import:label_conflict_listings"],
        "stats": dict(sorted(stats.items())),
        "report": report,
    }
    create_table_artifact(
        key="ingest-counts",
        table=[{"count": k, "value": v} for k, v in summary.items() if isinstance(v, int)]
        + [{"count": f"rejected:{k}", "value": v} for k, v in summary["rejected_by_reason"].items()],
        description="Ingest: manifest v0 counts",
    )
    create_markdown_artifact(
        key="ingest-manifest",
        markdown=f"**Manifest v0**: `{manifest_uri}` ({summary['rows']} rows, "
        f"{summary['images']} images, {summary['listings']} listings)\n\n**Rejected photo refs**: `{rejects_uri}`",
    )
    logger.info("manifest %s: %d rows, %d images, %d listings", manifest_uri, summary["rows"],
                summary["images"], summary["listings"])
    return summary


def parser() -> argparse.ArgumentParser:
    p = make_parser("python -m flows.ingest", ingest.__doc__, IngestParams)
    p.add_argument("path", nargs="?", help="a seed-style class-folder dataset to import (path or s3://): "
                                           "the same as --folders, with --layout folders")
    p.add_argument("--layout", choices=["crawl", "folders"], default="crawl",
                   help="crawl: read the listing feeds in storage; folders: import PATH first")
    return p


@entry_point
def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.path and args.layout != "folders":
        p.error("PATH needs --layout folders (crawl feeds are read from storage)")
    params = parse_params(IngestParams, args, **({"folders": args.path} if args.path and "folders" not in args else {}))
    if params.folders:
        check_folder_dataset(params.folders)  # a typo is one line, before any flow run
    summary = ingest(params)
    for line in summary["report"]:
        print(line)
    print(json.dumps({k: v for k, v in summary.items() if k not in ("stats", "report")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
