"""The nightly run's decisions and its run summary.

Pure functions first:

- :func:`train_decision`: train tonight or not, from the dataset version (never the
  clock): ``train="auto"`` trains only when no registered classifier was trained on this
  dataset version (:func:`trained_on` reads the registry meta's ``dataset_version``);
  ``"on"`` always trains, ``"off"`` never.
- :func:`stage_counts`: per manifest (ingest → clean → car filter → crop → dataset), the
  images kept and the rows this stage dropped, by reason. Every manifest carries the
  drops of the stages before it (an image that a stage drops stays in the table), so a
  stage's own drops are its reason counts minus the previous manifest's.
- :func:`funnel_line` / :func:`human_count`: the funnel as the seeds wrote it,
  ``1.6 M → 691k (42%)`` (each stage's share of the first stage's images).
- :func:`summary_markdown`: the run summary: the funnel, a kept/dropped table per stage,
  the training decision and links to the evaluation report.

Then the publishing: :func:`read_stage_counts` reads the manifests from storage, and
:func:`publish_run_summary` writes ``runs/<run>/summary.md`` next to a ``summary.json``
in the storage (:func:`carflow.keys.run_summary_key`) and publishes the markdown as the
``nightly-summary`` (or ``demo-summary``) artifact.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from carflow import keys
from carflow.manifest import DROPPED, KEPT, ManifestMissing, manifest_key, read_manifest, to_pandas
from carflow.registry import Registry, Version
from carflow.storage import Storage, open_storage

#: the manifests of the funnel, in DAG order (stage name → label)
FUNNEL_STAGES: dict[str, str] = {
    "ingest": "ingest",
    "clean": "clean",
    "car_filter": "car filter",
    "crop": "crop",
    "dataset": "dataset",
}
TRAIN_MODES = ("auto", "on", "off")


# ---------------------------------------------------------------------------------------
# train or not
# ---------------------------------------------------------------------------------------
def train_decision(mode: str, dataset_version: str, trained: str | None) -> tuple[bool, str]:
    """(train?, why). ``trained``: the classifier version already trained on
    ``dataset_version`` (None when there is none)."""
    if mode not in TRAIN_MODES:
        raise ValueError(f"train must be one of {TRAIN_MODES}, got {mode!r}")
    if mode == "off":
        return False, "train=off"
    if mode == "on":
        return True, "train=on"
    if trained:
        return False, f"dataset {dataset_version} unchanged: classifier {trained} was trained on it"
    return True, f"dataset {dataset_version} is new: no classifier was trained on it"


def trained_on(store: Storage | str | None, dataset_version: str) -> str | None:
    """The newest registered classifier version trained on ``dataset_version`` (None if none)."""
    found: list[Version] = [v for v in Registry(open_storage(store)).versions("classifier")
                            if str(v.meta.get("dataset_version")) == str(dataset_version)]
    return found[-1].version if found else None


def classifier_summary(store: Storage | str | None, version: str, dataset_version: str) -> dict[str, Any]:
    """What the run summary says about a classifier version: its folder, the headline
    numbers and files of its evaluation on ``dataset_version`` (its ``metrics.json``;
    empty when it was not evaluated there) and its promotion record."""
    v = Registry(open_storage(store)).get("classifier", version)
    try:
        metrics = v.get_json(keys.eval_name(dataset_version, "metrics.json"))
    except KeyError:
        metrics = {}
    files = dict(metrics.get("files", {}))
    if metrics:  # written after metrics.json, so not listed in it
        files.update({name: v.uri(keys.eval_name(dataset_version, name)) for name in ("metrics.json", "report.md")})
    return {"version": v.version, "folder": v.uri(), "promotion": v.meta.get("promotion"),
            "evaluation": {k: metrics.get(k) for k in ("top1", "top5", "macro_f1", "n_test")} if metrics else {},
            "files": files, "metrics": metrics}


# ---------------------------------------------------------------------------------------
# the funnel
# ---------------------------------------------------------------------------------------
#: the manifest columns :func:`stage_counts` reads
COUNT_COLUMNS = ["status", "reason", "split", "image_id", "train_image_id"]


def _image_column(stage: str, df: pd.DataFrame) -> str:
    if stage == "dataset" and "train_image_id" in df.columns:
        return "train_image_id"
    return "image_id"


def stage_counts(manifests: Mapping[str, pd.DataFrame]) -> list[dict[str, Any]]:
    """One entry per manifest given (in :data:`FUNNEL_STAGES` order): ``stage``,
    ``rows``, ``images`` (distinct images kept: for the dataset, the distinct train images
    in a split), ``kept`` (rows), ``dropped`` (rows this stage dropped) and
    ``dropped_by_reason`` (this stage's drops only)."""
    out: list[dict[str, Any]] = []
    before: Counter = Counter()
    for stage in FUNNEL_STAGES:
        if stage not in manifests:
            continue
        df = manifests[stage]
        if stage == "dataset":
            kept = df["split"].notna()
        else:
            kept = df["status"].eq(KEPT)
        reasons = Counter({str(k): int(v) for k, v in
                           df.loc[df["status"].eq(DROPPED), "reason"].fillna("unknown").value_counts().items()})
        if stage == "dataset":  # kept rows outside every split (split conflicts) are dropped here too
            extra = int((df["status"].eq(KEPT) & ~kept).sum())
            if extra:
                reasons["not_in_split"] += extra
        own = {r: n - before.get(r, 0) for r, n in sorted(reasons.items()) if n - before.get(r, 0) > 0}
        before = reasons
        out.append({
            "stage": stage,
            "rows": len(df),
            "images": int(df.loc[kept, _image_column(stage, df)].nunique()),
            "kept": int(kept.sum()),
            "dropped": int(sum(own.values())),
            "dropped_by_reason": own,
        })
    return out


def human_count(n: int) -> str:
    """``1.6 M``, ``691k``, ``12.3k``, ``950`` (the seeds' way of writing image counts)."""
    if n >= 1_000_000:
        return f"{n / 1_000_000:.1f} M"
    if n >= 100_000:
        return f"{n / 1000:.0f}k"
    if n >= 10_000:
        return f"{n / 1000:.1f}k"
    return str(n)


def funnel_line(counts: Sequence[Mapping[str, Any]]) -> str:
    """``ingest 1.6 M → clean 1.2 M (75%) → … → dataset 691k (42%)``: the images kept
    per stage, each as a share of the first stage's."""
    if not counts:
        return ""
    first = counts[0]["images"]
    parts = []
    for i, c in enumerate(counts):
        text = f"{FUNNEL_STAGES.get(c['stage'], c['stage'])} {human_count(c['images'])}"
        if i and first:
            text += f" ({c['images'] / first:.0%})"
        parts.append(text)
    return " → ".join(parts)


def summary_markdown(title: str, counts: Sequence[Mapping[str, Any]], facts: Sequence[str] = (),
                     links: Mapping[str, str] | None = None) -> str:
    """The run summary: the funnel, ``facts`` (one bullet each: the training decision,
    the test accuracy …), a kept/dropped-by-reason table per stage, then ``links``
    (name → URI: the evaluation report, the galleries …)."""
    lines = [f"# {title}", "", f"**Funnel (images kept):** {funnel_line(counts)}", ""]
    lines += [f"- {f}" for f in facts]
    if facts:
        lines.append("")
    lines += ["| stage | rows | kept rows | images | dropped | dropped by reason |",
              "|---|---:|---:|---:|---:|---|"]
    for c in counts:
        reasons = ", ".join(f"{r}: {n}" for r, n in c["dropped_by_reason"].items()) or "—"
        lines.append(f"| {FUNNEL_STAGES.get(c['stage'], c['stage'])} | {c['rows']} | {c['kept']} | {c['images']} "
                     f"| {c['dropped']} | {reasons} |")
    if links:
        lines += ["", "## Artifacts", ""]
        lines += [f"- [{name}]({uri})" for name, uri in links.items() if uri]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------
# storage and Prefect
# ---------------------------------------------------------------------------------------
def read_stage_counts(store: Storage | str | None, prefix: str = "manifests") -> list[dict[str, Any]]:
    """:func:`stage_counts` of the manifests in storage (a stage that never ran is left out);
    only the columns the counts need are read (:data:`COUNT_COLUMNS`)."""
    store = open_storage(store)
    frames: dict[str, pd.DataFrame] = {}
    for stage in FUNNEL_STAGES:
        try:
            frames[stage] = to_pandas(read_manifest(store, manifest_key(stage, prefix=prefix), columns=COUNT_COLUMNS))
        except ManifestMissing:
            continue
    return stage_counts(frames)


def publish_run_summary(store: Storage | str | None, run: str, title: str, facts: Sequence[str] = (),
                        links: Mapping[str, str] | None = None, artifact_key: str = "nightly-summary",
                        extra: Mapping[str, Any] | None = None, prefix: str = "manifests") -> dict[str, Any]:
    """Count the manifests, write ``runs/<run>/summary.md`` and ``summary.json`` in the
    storage and publish the markdown as a Prefect artifact (skipped outside a flow run).
    Returns ``counts``, ``funnel``, ``markdown`` and the two URIs."""
    store = open_storage(store)
    counts = read_stage_counts(store, prefix)
    markdown = summary_markdown(title, counts, facts, links)
    md_key, json_key = keys.run_summary_key(run, "summary.md"), keys.run_summary_key(run, "summary.json")
    store.put(md_key, markdown.encode(), content_type="text/markdown")
    doc = {"run": run, "funnel": funnel_line(counts), "stages": counts, "facts": list(facts),
           "links": dict(links or {}), **(extra or {})}
    store.put(json_key, json.dumps(doc, indent=2, default=str).encode(), content_type="application/json")
    try:
        from prefect.artifacts import create_markdown_artifact

        create_markdown_artifact(key=artifact_key, markdown=markdown, description=title)
    except Exception:  # noqa: BLE001 - outside a flow run: the files in storage are the summary
        pass
    return {"counts": counts, "funnel": doc["funnel"], "markdown": markdown, "uri": store.uri(md_key),
            "json_uri": store.uri(json_key)}
