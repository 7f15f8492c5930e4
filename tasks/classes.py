"""Classes: which make/model labels the classifier learns.

Input: the cleaned (or cropped) manifest, one row per photo occurrence with ``make``,
``model``, ``year``, ``label``, ``status``, ``reason`` and, from dedup, ``dup_cluster``
and ``label_conflict``. Output: the same rows with ``class_label`` (the class of every
row that has a label, dropped or not) and kept rows that cannot be trained on turned
into ``status='dropped'`` with a reason. Nothing is deleted.

Steps (all vectorised over unique labels / groupby; no per-row Python):

1. **Base label** = normalised ``make_model``; with ``merge_years`` (default) year
   variants collapse (``mercedes-benz_v-class_2016`` + ``_2017`` → ``mercedes-benz_v-class``),
   without it the year stays in (``make_model_year``). Rows with no make/model fall back
   to the ``label`` column (its ``_YYYY`` suffix stripped when merging years); rows with
   no label at all and still kept are dropped with reason ``no_label``.
2. **Merge map** (YAML, :func:`load_merge_map`): look-alike models fold into one class,
   many to one. ``target: [source, ...]`` or ``source: target``; chains are followed
   (a → b, b → c gives a → c), cycles are an error. Keys may be base labels or
   year-labels (``bmw_3-series_2012``) when years are not merged.
3. **Label conflicts** (dedup's ``label_conflict`` clusters: one photo, several labels):
   re-checked on the class labels (two year variants of one model are no conflict any
   more). ``conflict_policy='majority'``: every row of the cluster gets the label most
   of its rows carry; a tie cannot be decided and drops the cluster's kept rows.
   ``'drop'``: the kept rows of every conflicting cluster are dropped. Reason
   ``label_conflict``. The same policy, through the same function, first settles a
   *listing* whose photos carry several labels (a folder import that found one listing
   id under ``ford_ranger_2017/`` and ``ford_ranger_2018/``: no conflict once years
   merge; ``ford_ranger/`` and ``bmw_x5/``: the majority of its photos, a tie drops it).
4. **Ignore list**: a kept row whose raw label, base label or class matches an entry
   (exact or shell glob ``bmw_*``) is dropped, reason ``ignored_class``.
5. **Rare classes**: classes with fewer than ``min_images`` *kept* rows after all the
   drops above (and the earlier dedup/crop drops) are dropped, reason ``rare_class``.

:func:`classes_document` turns the result into ``classes.json``: the ordered class list
(sorted; the index is the training label id), merges applied, counts, and a
``version`` = content hash of the class list + merges, stored at
``datasets/<version>/classes.json`` in the registry (:func:`write_classes`) — the
contract with training.

:func:`with_dataset_version` then makes ``version`` the **dataset version**: the class
list's hash (kept as ``classes_version``) plus the content hash of the rows that go into
the export (:func:`dataset_rows_hash`: ``train_image_id``, ``class_label``, ``split`` and
multilabel ``attributes``). The same data gives the same version (a rerun registers
nothing new and the nightly flow trains nothing); one new listing gives a new version,
and an existing version is never rewritten with other rows.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from prefect import task

from carflow.labels import _clean
from carflow.manifest import DROPPED, KEPT
from carflow.registry import Registry, Version
from carflow.settings import ClassesSettings
from carflow.storage import Storage

NO_LABEL = "no_label"
IGNORED = "ignored_class"
RARE = "rare_class"
LABEL_CONFLICT = "label_conflict"
#: bump when the class assignment logic changes (part of the classes.json version)
CODE_VERSION = "1"

_YEAR_SUFFIX = re.compile(r"_(?:19|20)\d{2}$")


class ClassesError(ValueError):
    """A merge map or ignore list is invalid; the message names the entry."""


# ---------------------------------------------------------------------------------------
# merge map
# ---------------------------------------------------------------------------------------
def _norm_label(label: Any) -> str:
    text = str(label).strip().lower()
    parts = [(_clean(p) or "") for p in text.split("_")]
    return "_".join(p for p in parts if p)


def load_merge_map(source: str | Path | Mapping[str, Any] | None) -> dict[str, str]:
    """A merge map as ``{source label: target class}``.

    ``source``: None (empty), a mapping, or a YAML file path / YAML text. Accepted shapes:
    ``target: [source, ...]`` (many to one; the target may list itself) and
    ``source: target``. Labels are normalised (lowercase, hyphens). Chains are resolved;
    a cycle or one source mapped to two targets raises :class:`ClassesError`."""
    if source is None:
        return {}
    if isinstance(source, Mapping):
        data: Any = dict(source)
        where = "merge map"
    else:
        path = Path(source)
        where = str(path)
        try:
            text = path.read_text() if path.exists() else str(source)
        except OSError:
            text = str(source)
        if not path.exists() and ":" not in text:
            raise ClassesError(f"classes.merge_map: {source} does not exist (CARFLOW_CLASSES__MERGE_MAP)")
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ClassesError(f"{where}: not valid YAML: {exc}") from exc
        if isinstance(data, dict) and isinstance(data.get("merge"), dict):
            data = data["merge"]
    if not isinstance(data, dict):
        raise ClassesError(f"{where}: the top level must be a mapping (target: [sources] or source: target)")
    pairs: dict[str, str] = {}
    for key, value in data.items():
        if isinstance(value, (list, tuple)):
            target = _norm_label(key)
            sources = [_norm_label(v) for v in value]
        elif isinstance(value, str):
            target, sources = _norm_label(value), [_norm_label(key)]
        else:
            raise ClassesError(f"{where}: entry {key!r} must map to a label or a list of labels, got {value!r}")
        for src in sources:
            if src == target:
                continue
            if src in pairs and pairs[src] != target:
                raise ClassesError(f"{where}: {src!r} is merged into both {pairs[src]!r} and {target!r}")
            pairs[src] = target
    resolved: dict[str, str] = {}
    for src in pairs:
        seen, cur = {src}, pairs[src]
        while cur in pairs:
            if cur in seen:
                raise ClassesError(f"{where}: merge cycle through {sorted(seen)}")
            seen.add(cur)
            cur = pairs[cur]
        resolved[src] = cur
    return dict(sorted(resolved.items()))


# ---------------------------------------------------------------------------------------
# building blocks (pure, vectorised)
# ---------------------------------------------------------------------------------------
def base_labels(df: pd.DataFrame, merge_years: bool = True) -> pd.Series:
    """The label of every row before merges: ``make_model`` (``make_model_year`` when
    years are not merged); from ``label`` when make/model are missing; else None."""
    n = len(df)
    make = df["make"] if "make" in df.columns else pd.Series([None] * n, index=df.index)
    model = df["model"] if "model" in df.columns else pd.Series([None] * n, index=df.index)
    both = make.notna() & model.notna() & (make.astype("string").str.len() > 0) & (model.astype("string").str.len() > 0)
    out = pd.Series(np.full(n, None, dtype=object), index=df.index)
    mm = make.astype("string") + "_" + model.astype("string")
    if not merge_years and "year" in df.columns:
        year = pd.to_numeric(df["year"], errors="coerce")
        has_year = year.notna()
        mm = mm.where(~has_year, mm + "_" + year.astype("Int64").astype("string"))
    out[both] = mm[both].astype(object)
    if "label" in df.columns:
        rest = ~both & df["label"].notna()
        if rest.any():
            lab = df.loc[rest, "label"].astype("string")
            if merge_years:
                lab = lab.str.replace(_YEAR_SUFFIX, "", regex=True)
            out[rest] = lab.astype(object)
    # normalise once per distinct value
    uniq = pd.unique(out[out.notna()])
    table = {u: _norm_label(u) or None for u in uniq}
    return out.map(table).astype(object).where(out.notna(), None)


def apply_merge_map(labels: pd.Series, merge_map: Mapping[str, str]) -> pd.Series:
    """``labels`` with every merge-map source replaced by its target."""
    if not merge_map:
        return labels.copy()
    mapped = labels.map(dict(merge_map))
    return mapped.where(mapped.notna(), labels).astype(object)


def _matches(values: pd.Series, patterns: list[str]) -> np.ndarray:
    """Boolean mask: the value equals or shell-matches any pattern (per distinct value)."""
    if not patterns:
        return np.zeros(len(values), dtype=bool)
    pats = [_norm_label(p) if not any(c in p for c in "*?[") else p.strip().lower() for p in patterns]
    uniq = pd.unique(values[values.notna()])
    hit = {u: any(fnmatch.fnmatchcase(str(u), p) for p in pats) for u in uniq}
    return values.map(hit).fillna(False).to_numpy(dtype=bool)


def resolve_label_conflicts(
    df: pd.DataFrame,
    labels: pd.Series,
    policy: str = "majority",
    group: str = "dup_cluster",
    flag: str | None = "label_conflict",
) -> tuple[pd.Series, np.ndarray, dict[str, int]]:
    """Majority vote (or drop) inside groups whose rows carry several class labels: dedup
    clusters (``group='dup_cluster'``: one photo, several labels) or listings
    (``group='listing_id'``, ``flag=None``: one listing filed under two class folders).

    Returns (new labels, mask of rows to drop with ``label_conflict``, counters). Only
    groups flagged in column ``flag`` are looked at (dedup never flags placeholders);
    when the column is missing every group is. A group is a conflict only if its rows
    still carry ≥ 2 distinct labels after year collapse and merges."""
    n = len(df)
    drop = np.zeros(n, dtype=bool)
    stats = {"conflict_clusters": 0, "conflict_resolved": 0, "conflict_dropped": 0, "relabelled_rows": 0}
    if group not in df.columns or n == 0:
        return labels.copy(), drop, stats
    cand = df[group].notna().to_numpy() & labels.notna().to_numpy()
    if flag is not None and flag in df.columns:
        cand &= df[flag].fillna(False).astype(bool).to_numpy()
    if not cand.any():
        return labels.copy(), drop, stats
    sub = pd.DataFrame({"c": df[group].to_numpy()[cand], "l": labels.to_numpy()[cand]})
    votes = sub.groupby(["c", "l"], sort=True).size().rename("n").reset_index()
    n_labels = votes.groupby("c")["l"].transform("size")
    votes = votes[n_labels > 1]
    if votes.empty:
        return labels.copy(), drop, stats
    votes = votes.sort_values(["c", "n", "l"], ascending=[True, False, True])
    top = votes.groupby("c").head(2)
    first = top.groupby("c").nth(0).set_index("c")
    second = top.groupby("c").nth(1).set_index("c")
    tie = first["n"] == second["n"].reindex(first.index)
    stats["conflict_clusters"] = len(first)
    cluster_col = df[group]
    in_conflict = cluster_col.isin(first.index).to_numpy()
    kept = (df["status"] != DROPPED).to_numpy()
    new = labels.copy()
    if policy == "drop":
        drop = in_conflict & kept
        stats["conflict_dropped"] = len(first)
        return new, drop, stats
    if policy != "majority":
        raise ClassesError(f"classes.conflict_policy must be 'majority' or 'drop', got {policy!r}")
    tied = set(first.index[tie.to_numpy()])
    winners = first.loc[~tie, "l"]
    rows_win = cluster_col.isin(winners.index).to_numpy()
    if rows_win.any():
        won = cluster_col[rows_win].map(winners)
        stats["relabelled_rows"] = int((won.to_numpy() != labels[rows_win].to_numpy()).sum())
        new[rows_win] = won.to_numpy()
    drop = cluster_col.isin(tied).to_numpy() & kept
    stats["conflict_resolved"] = len(winners)
    stats["conflict_dropped"] = len(tied)
    return new, drop, stats


def _drop(status: np.ndarray, reason: np.ndarray, mask: np.ndarray, why: str) -> int:
    mask = mask & (status == KEPT)
    status[mask] = DROPPED
    reason[mask] = why
    return int(mask.sum())


def assign_classes(
    df: pd.DataFrame, cfg: ClassesSettings | None = None, merge_map: Mapping[str, str] | None = None
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Add ``class_label`` and drop untrainable kept rows; returns (manifest, info).

    ``merge_map`` (already loaded) wins over ``cfg.merge_map`` (a YAML path). ``info``
    holds the class counts, the rare classes, the merges applied and drop counters —
    what :func:`classes_document` needs."""
    cfg = cfg or ClassesSettings()
    if merge_map is None:
        merge_map = load_merge_map(cfg.merge_map)
    out = df.copy()
    if "reason" not in out.columns:
        out["reason"] = None
    status = out["status"].to_numpy(dtype=object).copy()
    reason = out["reason"].to_numpy(dtype=object).copy()

    base = base_labels(out, cfg.merge_years)
    labels = apply_merge_map(base, merge_map)
    # a listing filed under two class folders (folder import), then a photo with two labels
    labels, listing_drop, listing_stats = resolve_label_conflicts(
        out, labels, cfg.conflict_policy, group="listing_id", flag=None
    )
    labels, conflict_drop, conflict_stats = resolve_label_conflicts(out, labels, cfg.conflict_policy)
    conflict_drop |= listing_drop
    drops = {NO_LABEL: _drop(status, reason, labels.isna().to_numpy(), NO_LABEL)}
    drops[LABEL_CONFLICT] = _drop(status, reason, conflict_drop, LABEL_CONFLICT)
    ignored = _matches(labels, cfg.ignore) | _matches(base, cfg.ignore)
    if "label" in out.columns:
        ignored |= _matches(out["label"].astype(object), cfg.ignore)
    drops[IGNORED] = _drop(status, reason, ignored, IGNORED)

    kept = status == KEPT
    counts = labels[kept].value_counts()
    rare = counts[counts < cfg.min_images]
    drops[RARE] = _drop(status, reason, labels.isin(rare.index).to_numpy(), RARE)
    counts = counts[counts >= cfg.min_images].sort_index()

    out["class_label"] = labels.astype(object)
    out["status"] = status
    out["reason"] = reason
    used = set(base[kept].dropna()) | set(out["label"].dropna()) if "label" in out.columns else set(base[kept].dropna())
    merges = {src: dst for src, dst in merge_map.items() if src in used}
    info = {
        "counts": {str(k): int(v) for k, v in counts.items()},
        "rare": {str(k): int(v) for k, v in rare.sort_index().items()},
        "merges": merges,
        "merge_map": dict(merge_map),
        "dropped": {k: v for k, v in drops.items()},
        "conflicts": conflict_stats,
        "listing_conflicts": listing_stats,
        "ignored_labels": sorted(set(labels[ignored].dropna()) | set(base[ignored].dropna())),
    }
    return out, info


def class_version(classes: list[str], merges: Mapping[str, str], merge_years: bool = True) -> str:
    """Content hash of the class list and the merges (12 hex digits)."""
    payload = json.dumps(
        {"classes": list(classes), "merges": dict(sorted(merges.items())), "merge_years": merge_years, "code": CODE_VERSION},
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


#: the columns of a dataset row that its version covers (what training reads)
VERSION_COLUMNS = ("train_image_id", "class_label", "split", "attributes")


def dataset_rows_hash(df: pd.DataFrame) -> str:
    """Content hash (16 hex digits) of the dataset rows (``split`` set): their
    :data:`VERSION_COLUMNS`, deduplicated and sorted, so row order and the other columns
    (timestamps, crawl ids, scores) never change it. ``train_image_id`` falls back to
    ``crop_id``, then ``image_id``."""
    rows = df[df["split"].notna()] if "split" in df.columns else df.iloc[:0]
    if "train_image_id" not in rows.columns:
        rows = rows.assign(train_image_id=rows["crop_id"] if "crop_id" in rows.columns else rows["image_id"])
    cols = [c for c in VERSION_COLUMNS if c in rows.columns]
    out = pd.DataFrame({c: rows[c].map(_version_text) for c in cols})
    lines = sorted(set(out.agg("\x1f".join, axis=1))) if len(out) else []
    h = hashlib.sha256("\x1f".join(cols).encode())
    for line in lines:
        h.update(line.encode())
        h.update(b"\n")
    return h.hexdigest()[:16]


def _version_text(value: Any) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    if isinstance(value, (list, tuple, np.ndarray)):
        return ",".join(sorted(str(v) for v in value))
    return str(value)


def dataset_version(classes_version: str, rows_hash: str) -> str:
    """The dataset version (12 hex digits): the classes version and the rows' content hash."""
    return hashlib.sha256(f"{classes_version}:{rows_hash}".encode()).hexdigest()[:12]


def with_dataset_version(doc: Mapping[str, Any], df: pd.DataFrame) -> dict[str, Any]:
    """``classes.json`` with ``version`` = :func:`dataset_version` of its classes version
    and ``df``'s dataset rows (after the split); the class-list hash stays as
    ``classes_version``, the rows' hash as ``rows_hash``."""
    classes_version = str(doc.get("classes_version") or doc["version"])
    rows = dataset_rows_hash(df)
    return {**doc, "version": dataset_version(classes_version, rows), "classes_version": classes_version,
            "rows_hash": rows}


def classes_document(info: Mapping[str, Any], cfg: ClassesSettings | None = None) -> dict[str, Any]:
    """``classes.json``: ``version``, ordered ``classes`` (index = label id),
    ``counts``, ``merges`` (source → class, the whole map), ``merge_years``,
    ``min_images``, ``ignore``, ``conflict_policy``, ``dropped_classes`` (rare, with
    counts) and drop counters."""
    cfg = cfg or ClassesSettings()
    classes = sorted(info["counts"])
    merges = dict(info.get("merge_map") or info.get("merges") or {})
    return {
        "version": class_version(classes, merges, cfg.merge_years),
        "classes": classes,
        "num_classes": len(classes),
        "counts": {c: int(info["counts"][c]) for c in classes},
        "merges": merges,
        "merges_applied": dict(info.get("merges") or {}),
        "merge_years": cfg.merge_years,
        "min_images": cfg.min_images,
        "ignore": list(cfg.ignore),
        "conflict_policy": cfg.conflict_policy,
        "dropped_classes": dict(info.get("rare") or {}),
        "dropped_rows": dict(info.get("dropped") or {}),
    }


def write_classes(store: Storage, doc: Mapping[str, Any], meta: Mapping[str, Any] | None = None,
                  promote: bool = True) -> Version:
    """Register ``classes.json`` as dataset version ``doc["version"]``
    (``datasets/<version>/classes.json``, then ``meta.json`` with ``meta``) and, with
    ``promote``, move the registry's ``latest`` dataset pointer to it. Call it last, after
    the dataset's exports, so ``latest`` only ever names a complete dataset."""
    registry = Registry(store)
    summary = {k: doc[k] for k in ("classes", "num_classes", "counts") if k in doc}
    version = registry.put_version(
        "dataset", {"classes.json": json.dumps(doc, indent=2, sort_keys=False).encode()},
        {**summary, **(meta or {})}, version=str(doc["version"]),
    )
    if promote:
        registry.promote("dataset", version)
    return version


# ---------------------------------------------------------------------------------------
# Prefect task (thin): a sub-second reduce over the label columns; not cached (its input
# is the whole manifest, already content-addressed by the stages before it)
# ---------------------------------------------------------------------------------------
@task(name="assign-classes", retries=1)
def assign_classes_task(df: pd.DataFrame, config: dict[str, Any]) -> tuple[pd.DataFrame, dict[str, Any]]:
    return assign_classes(df, ClassesSettings(**config))
