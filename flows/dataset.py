"""Dataset flow: classes → split → leakage check → exports.

    python -m flows.dataset [--storage URI] [--min-images N] [--merge-map YAML]
                            [--ignore LABEL ...] [--conflict-policy majority|drop]
                            [--export URI] [--tfrecord [URI]] [--tfrecord-size N]

Reads ``--source`` when given, else ``manifests/crop/manifest.parquet``, else (a model
stage that never ran here) the nearest earlier manifest, car_filter then clean; the input
must be current (its lineage is checked: a crop manifest built from an older clean
manifest stops the run with the stages to rerun). Every row gets ``train_image_id``, the image it
trains on: the crop (``crop_id``) from the crop manifest, else the photo (``image_id``);
a kept crop-manifest row without a crop is dropped as ``not_cropped``, never exported
uncropped. Registers ``datasets/<version>/classes.json`` (the contract with training)
in the registry and moves its ``latest`` pointer only after every export succeeded;
updates ``datasets/assignments.parquet`` (listing → split; an assigned listing never
moves) and writes ``manifests/dataset/manifest.parquet`` (every row, with
``class_label``, ``split`` and ``train_image_id``). The leakage check fails the flow
before anything is written. Publishes per-class counts per split as a table artifact
and a bar chart PNG beside the manifest (linked from a markdown artifact).

Exports, each on request (``tasks/export.py``):

- folders (``--export URI`` / ``split.export_uri``): the seeds' layout
  ``<split>/<class>/<train_image_id>.jpg`` in a local folder or ``s3://`` prefix;
- TFRecord (``--tfrecord`` / ``split.tfrecord``), the training format, incremental:
  content-keyed shards ``datasets/exports/<family>/shards/<key>.tfrecord`` of JPEGs
  resized to ``split.tfrecord_size`` (default ``train.image_size``;
  ``split.tfrecord_fit``: size×size, or a shorter side of size), then the version's
  index ``datasets/<version>/export.json``, in the storage unless
  ``split.tfrecord_uri`` / a URI is given; only new or changed rows are encoded.
  ``--gc-exports`` deletes the shards no index references (run it when no export runs).

The summary's ``exports`` holds, per export, its URI and the images per split.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from typing import Annotated, Any, Literal

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from pydantic import Field

from carflow import keys
from carflow.manifest import (
    CLEAN_SCHEMA,
    DATASET_SCHEMA,
    DROPPED,
    from_pandas,
    input_key,
    manifest_key,
    read_input,
    to_pandas,
    write_manifest,
)
from carflow.settings import ClassesSettings, SplitSettings, get_settings
from carflow.storage import open_storage
from flows.entry import entry_point
from flows.params import (
    Flag,
    FlowParams,
    make_parser,
    params_flow,
    parse_params,
    refresh_field,
    storage_field,
)
from tasks.classes import assign_classes_task, classes_document, with_dataset_version, write_classes
from tasks.export import (
    export_folders_task,
    export_tfrecords_task,
    gc_export_shards,
    with_train_image_id,
)
from tasks.report import publish_split_chart
from tasks.split import (
    SPLITS,
    assign_splits_task,
    check_leakage_task,
    read_assignments,
    write_assignments,
)


class DatasetParams(FlowParams):
    """The cleaned/cropped manifest → classes, split, the dataset manifest and exports.
    Unset fields take the ``classes`` / ``split`` settings."""

    storage: str | None = storage_field()
    min_images: int | None = Field(None, ge=1, description="classes with fewer images are dropped as rare_class "
                                                           "(classes.min_images)")
    merge_map: str | None = Field(None, description="a YAML map of labels to merge (classes.merge_map)")
    ignore: list[str] | None = Field(None, description="labels or globs to leave out (classes.ignore)")
    conflict_policy: Literal["majority", "drop"] | None = Field(
        None, description="a listing with two labels: take the majority, or drop it (classes.conflict_policy)")
    export_uri: Annotated[str | None, Flag(name="--export")] = Field(
        None, description="export <split>/<class>/<train_image_id>.jpg here (path or s3:// URI; split.export_uri)")
    run: str | None = Field(None, description="the run id recorded with new split assignments (default: the time)")
    tfrecord: Annotated[bool | None, Flag(cli=False)] = Field(
        None, description="export TFRecord shards, the training format (default: split.tfrecord)")
    tfrecord_uri: Annotated[str | None, Flag(cli=False)] = Field(
        None, description="where the TFRecord export goes (default: split.tfrecord_uri, else the storage)")
    tfrecord_size: int | None = Field(None, ge=16, description="side of the exported JPEGs in pixels "
                                                               "(split.tfrecord_size, default train.image_size)")
    source: str | None = Field(None, description="input stage (crop, car_filter, clean) or manifest key; default: "
                                                 "crop, else the nearest earlier stage that has run")
    refresh: bool = refresh_field("encode every image of the TFRecord export")


@params_flow(name="dataset", log_prints=True)
def dataset(params: DatasetParams = DatasetParams()) -> dict[str, Any]:
    """Cleaned/cropped manifest → classes.json, split assignments, the dataset manifest
    and the requested exports (folders with ``export_uri``, TFRecord with ``tfrecord``).
    ``source`` (a stage name or manifest key) picks the input; by default the crop
    manifest, else the nearest earlier one (:func:`carflow.manifest.input_key`), which
    must be current. The registry's ``latest`` dataset moves only after the exports."""
    logger = get_run_logger()
    cfg = get_settings()
    p = params
    storage, export_uri, run, tfrecord, tfrecord_size = p.storage, p.export_uri, p.run, p.tfrecord, p.tfrecord_size
    store = open_storage(storage)
    prefix = cfg.runtime.manifests_prefix
    overrides = {
        k: v
        for k, v in {"min_images": p.min_images, "merge_map": p.merge_map, "ignore": p.ignore,
                     "conflict_policy": p.conflict_policy}.items()
        if v is not None
    }
    classes_cfg = ClassesSettings(**{**cfg.classes.model_dump(), **overrides})
    split_cfg: SplitSettings = cfg.split
    export_uri = export_uri or split_cfg.export_uri
    tfrecord = split_cfg.tfrecord if tfrecord is None else tfrecord
    tfrecord_size = tfrecord_size or split_cfg.tfrecord_size or cfg.train.image_size
    run = run or datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")

    inp = read_input(store, input_key(store, "dataset", p.source, prefix), CLEAN_SCHEMA)
    df = to_pandas(inp.table)
    logger.info("dataset input %s: %d rows", store.uri(inp.key), len(df))
    df, not_cropped = with_train_image_id(df)
    if not_cropped:
        logger.warning("%d kept row(s) of %s have no crop_id: dropped as not_cropped", not_cropped, inp.key)

    df, class_info = assign_classes_task(df, classes_cfg.model_dump(mode="json"))
    doc = classes_document(class_info, classes_cfg)

    previous = read_assignments(store, keys.assignments_key())
    df, assignments, split_info = assign_splits_task(df, previous, split_cfg.model_dump(mode="json"), run)
    # raises LeakageError (fails the flow) before the assignments or the manifest are written
    report = check_leakage_task(df, list(split_cfg.group_by))

    assignments_uri = write_assignments(store, keys.assignments_key(), assignments)
    df["classes_version"] = doc["version"]
    doc = with_dataset_version(doc, df)  # the version covers the rows: same data, same version
    out_key = manifest_key("dataset", prefix=prefix)
    manifest_uri = write_manifest(store, out_key, from_pandas(df), DATASET_SCHEMA, lineage=inp.lineage())
    chart_uri = publish_split_chart(storage, report, keys.manifest_side_key("dataset", "split_counts.png", prefix),
                                    list(SPLITS))

    exports: dict[str, Any] = {}
    if export_uri:
        folders = export_folders_task(df, storage, export_uri, cfg.runtime.max_workers)
        exports["folders"] = {"uri": open_storage(export_uri).uri(), **folders}
    if tfrecord:
        dest = p.tfrecord_uri or split_cfg.tfrecord_uri
        index = export_tfrecords_task(
            df, storage, dest, doc, tfrecord_size, split_cfg.tfrecord_shard_images, split_cfg.tfrecord_quality,
            split_cfg.tfrecord_fit, cfg.runtime.max_workers, version=doc["version"], refresh=p.refresh,
        )
        exports["tfrecord"] = {
            "uri": open_storage(dest or storage).uri(),
            "index": index["index_uri"],
            "image_size": index["image_size"],
            "fit": index["fit"],
            "per_split": {s: int(index["splits"][s]["count"]) for s in SPLITS},
            "shards": {s: len(index["splits"][s]["shards"]) for s in SPLITS},
            "encoded": index["encoded"],
            "shards_written": index["shards_written"],
            "shards_reused": index["shards_reused"],
            "excluded": len(index["excluded"]),
            "skipped": index["skipped"],
            "missing": index["missing"],
            "undecodable": index["undecodable"],
        }

    # every file is written: register the version (classes.json, then meta.json) and move `latest`
    version = write_classes(store, doc, {
        "manifest": out_key, "input": inp.key, "input_hash": inp.hash, "assignments": keys.assignments_key(),
        "per_split": {s: int((df["split"] == s).sum()) for s in SPLITS},
        "exports": {k: {"uri": v["uri"], "per_split": v["per_split"]} for k, v in exports.items()},
    })
    classes_uri = version.uri("classes.json")

    table = [
        {"class": str(c), **{s: int(report.at[c, s]) for s in SPLITS}, "total": int(report.at[c, "total"]),
         **{f"{s}_frac": float(report.at[c, f"{s}_frac"]) for s in SPLITS}}
        for c in report.index
    ]
    create_table_artifact(key="dataset-split-counts", table=table, description="Images per class and split")
    conflicts = split_info["conflicts"]
    create_markdown_artifact(
        key="dataset-summary",
        markdown=(
            f"## Dataset {doc['version']}\n\n"
            f"- classes ({doc['num_classes']}): {', '.join(doc['classes'])}\n"
            f"- classes.json: `{classes_uri}`\n- manifest: `{manifest_uri}`\n"
            f"- assignments: `{assignments_uri}`\n"
            f"- rare classes dropped: {doc['dropped_classes']}\n"
            f"- split conflicts: {len(conflicts)} ({split_info['split_conflict_rows']} rows dropped)\n"
            + "".join(f"- export {k}: `{v['uri']}` {v['per_split']}\n" for k, v in exports.items())
            + f"\n![images per class and split]({chart_uri})\n\n[bar chart]({chart_uri})\n"
        ),
    )
    dropped = df.loc[df["status"] == DROPPED, "reason"].value_counts()
    summary = {
        "input": store.uri(inp.key),
        "manifest": manifest_uri,
        "classes_json": classes_uri,
        "version": doc["version"],
        "classes": doc["classes"],
        "class_counts": doc["counts"],
        "rare_classes": doc["dropped_classes"],
        "merges_applied": doc["merges_applied"],
        "rows": len(df),
        "dataset_rows": int(df["split"].notna().sum()),
        "per_split": {s: int((df["split"] == s).sum()) for s in SPLITS},
        "per_class_split": {r["class"]: {s: r[s] for s in SPLITS} for r in table},
        "dropped_by_reason": {str(k): int(v) for k, v in sorted(dropped.items())},
        "assignments": assignments_uri,
        "new_listings_assigned": split_info["new_listings_assigned"],
        "split_conflicts": conflicts,
        "chart": chart_uri,
        "train_images": "crop_id" if "crop_id" in df.columns else "image_id",
        "not_cropped": not_cropped,
        "exports": exports,
    }
    logger.info("dataset %s: %s", doc["version"], {k: summary[k] for k in ("classes", "per_split", "dropped_by_reason")})
    return summary


def parser() -> argparse.ArgumentParser:
    p = make_parser("python -m flows.dataset", dataset.__doc__, DatasetParams)
    p.add_argument(
        "--tfrecord", nargs="?", const="", default=None, metavar="URI",
        help="export TFRecord shards (default place: split.tfrecord_uri, else the storage)",
    )
    p.add_argument("--gc-exports", action="store_true",
                   help="only delete export shards that no dataset version's export.json references")
    return p


@entry_point
def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    if a.gc_exports:
        dest = a.tfrecord or get_settings().split.tfrecord_uri or getattr(a, "storage", None)
        print(json.dumps(gc_export_shards(open_storage(dest)), indent=2))
        return 0
    tfrecord = {"tfrecord": True, "tfrecord_uri": a.tfrecord or None} if a.tfrecord is not None else {}
    out = dataset(parse_params(DatasetParams, a, **tfrecord))
    print(json.dumps(out, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
