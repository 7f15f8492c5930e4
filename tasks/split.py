"""Split: grouped, stratified, stable train/val/test assignment, and the leakage check.

Input: the manifest after :mod:`tasks.classes` (``class_label``; kept rows with a class
are the *dataset rows*). Output: the same rows with ``split`` (train|val|test on
dataset rows, None elsewhere), ``split_group`` (the group key of the row's listing) and
``split_conflict`` (rows cut out of the grouping, see below), plus the updated
persisted assignments (listing_id → split).

**Groups.** Listings are nodes; every value of a ``group_by`` column (``dup_cluster``,
``image_id``, ``source_id``) shared by rows of several listings joins them (all rows of
a cluster count, kept or dropped as duplicates). Connected components by array
union-find (:func:`union_find`: hook-to-minimum + pointer jumping, no Python loop over
rows). A group's key is its smallest ``listing_id``.

**Stability.** ``previous`` assignments (``datasets/assignments.parquet``: listing_id,
split, group_key, run) are never changed: an assigned listing keeps its split forever.
Per group, the distinct previous splits of its listings decide:

* none → a *new* group: assigned below;
* one → every listing of the group (new ones too) takes that split;
* two or more → a **split conflict**: new data joined groups that already sit in
  different splits (a new listing sharing photos with a train and a test listing, or
  dedup merging two old clusters through a new photo). Old listings keep their
  splits; the new listings of that group get no split and their kept rows are dropped
  with reason ``split_conflict`` (putting them on either side would leak, moving old
  ones is forbidden). Then, for every group_by value whose rows still lie in listings of
  different splits (possible only when old rows were merged into one dup cluster), the
  rows outside the value's first split (the split of its smallest listing_id) are cut
  from the grouping: ``split_conflict=True``, kept ones dropped with that reason. Every
  conflict is recorded (:func:`assign_splits` returns them; the flow publishes them).

**New groups** (only those with dataset rows) are stratified by their class (the
class most of their dataset rows have). Inside a class, new groups are ordered by a
hash of (split seed, group key); the class's target per split is ``ratio × (old + new
images)``; the shortfall of each split (target − images already there, floored at 0)
becomes a quota; walking the hash order, a group goes to the split whose cumulative
quota its midpoint falls in. With no previous data this is a plain stratified split
(error ≤ one group per class); with previous data it pulls the class back toward the
ratios using new groups only.

**Leakage check** (:func:`check_leakage`): raises :class:`LeakageError` if a listing,
any group_by value or a union-find group holds rows of two splits (rows with
``split_conflict`` excluded), and reports per-class counts and ratios.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from prefect import task

from carflow.graph import connected_components as union_find
from carflow.manifest import DROPPED, KEPT
from carflow.settings import SplitSettings

SPLITS = ("train", "val", "test")
SPLIT_CONFLICT = "split_conflict"
ASSIGNMENT_COLUMNS = ("listing_id", "split", "group_key", "run")
#: conflicts described in detail (all are counted and resolved)
MAX_RECORDED = 1000


class LeakageError(AssertionError):
    """A listing, a duplicate cluster or a group spans two splits."""


# ---------------------------------------------------------------------------------------
# union-find over arrays
# ---------------------------------------------------------------------------------------
def _key_edges(listing_codes: np.ndarray, values: pd.Series, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Edges (listing, smallest listing sharing the value) for one group_by column."""
    sel = mask & values.notna().to_numpy()
    if not sel.any():
        return np.empty(0, np.int64), np.empty(0, np.int64)
    kc, uniq = pd.factorize(values[sel])
    lc = listing_codes[sel]
    mins = np.full(len(uniq), np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(mins, kc, lc)
    return lc, mins[kc]


def group_listings(
    df: pd.DataFrame, group_by: Sequence[str] = ("dup_cluster", "image_id", "source_id"), mask: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Union-find groups of listings joined by shared ``group_by`` values.

    Returns ``(listing_codes, listings, group)``: each row's listing code, the sorted
    distinct listing ids, and for each listing its group = the code of the smallest
    listing id in the group. ``mask`` limits which rows make links (all rows by
    default)."""
    listing_codes, listings = pd.factorize(df["listing_id"], sort=True)
    listing_codes = listing_codes.astype(np.int64)
    if mask is None:
        mask = np.ones(len(df), dtype=bool)
    us, vs = [], []
    for col in group_by:
        if col in df.columns:
            u, v = _key_edges(listing_codes, df[col], mask)
            us.append(u)
            vs.append(v)
    n = len(listings)
    if not us:
        return listing_codes, np.asarray(listings, dtype=object), np.arange(n, dtype=np.int64)
    group = union_find(n, np.concatenate(us), np.concatenate(vs))
    return listing_codes, np.asarray(listings, dtype=object), group


def group_hash(keys: np.ndarray, seed: str) -> np.ndarray:
    """uint64 hash of each group key under the split seed (vectorised siphash)."""
    hash_key = hashlib.sha256(seed.encode()).hexdigest()[:16]
    return pd.util.hash_array(np.asarray(keys, dtype=object), hash_key=hash_key, categorize=False)


def _ratios(cfg: SplitSettings) -> np.ndarray:
    return np.array([cfg.train, cfg.val, cfg.test], dtype=float)


def _bits_to_split(bits: np.ndarray) -> np.ndarray:
    """Single-bit masks 1/2/4 → split code 0/1/2 (others → -1)."""
    out = np.full(bits.shape, -1, dtype=np.int8)
    for code in range(3):
        out[bits == (1 << code)] = code
    return out


def _popcount3(bits: np.ndarray) -> np.ndarray:
    return (bits & 1) + ((bits >> 1) & 1) + ((bits >> 2) & 1)


def dataset_mask(df: pd.DataFrame) -> np.ndarray:
    """Rows that are in the dataset: kept and with a class."""
    kept = (df["status"] == KEPT).to_numpy().copy()
    if "class_label" in df.columns:
        kept &= df["class_label"].notna().to_numpy()
    return kept


def assign_new_groups(
    group_class: np.ndarray,
    group_weight: np.ndarray,
    group_key: np.ndarray,
    old_counts: pd.DataFrame,
    cfg: SplitSettings,
) -> np.ndarray:
    """Split codes (0/1/2) for new groups: per class, hash order + cumulative quotas.

    ``group_class``/``group_weight``/``group_key``: one entry per new group (class,
    dataset rows, key). ``old_counts``: images already assigned per class (index) and
    split (columns ``train``/``val``/``test``)."""
    m = len(group_class)
    if m == 0:
        return np.empty(0, dtype=np.int8)
    ratios = _ratios(cfg)
    h = group_hash(group_key, cfg.seed)
    order = np.lexsort((h, group_class))  # by class, then hash
    cls_sorted = group_class[order]
    w = group_weight[order].astype(float)
    cls_codes, cls_uniq = pd.factorize(cls_sorted)
    total_new = np.bincount(cls_codes, weights=w, minlength=len(cls_uniq))
    old = old_counts.reindex(index=cls_uniq, columns=list(SPLITS)).fillna(0).to_numpy(dtype=float)
    target = ratios[None, :] * (old.sum(axis=1) + total_new)[:, None]
    deficit = np.clip(target - old, 0, None)
    dsum = deficit.sum(axis=1, keepdims=True)
    frac = np.where(dsum > 0, deficit / np.where(dsum > 0, dsum, 1), ratios[None, :])
    bounds = np.cumsum(frac, axis=1)  # per class: train end, val end, 1
    cum = pd.Series(w).groupby(cls_codes).cumsum().to_numpy()
    pos = (cum - w / 2) / total_new[cls_codes]
    b = bounds[cls_codes]
    code = np.where(pos < b[:, 0], 0, np.where(pos < b[:, 1], 1, 2)).astype(np.int8)
    # a split whose ratio is 0 never receives a group
    out = np.empty(m, dtype=np.int8)
    out[order] = code
    return out


def empty_assignments() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=object) for c in ASSIGNMENT_COLUMNS})


def assign_splits(
    df: pd.DataFrame,
    previous: pd.DataFrame | None = None,
    cfg: SplitSettings | None = None,
    run: str = "",
) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """Assign every dataset row a split; returns (manifest, assignments, info).

    ``assignments`` = ``previous`` unchanged plus the listings assigned now. ``info``:
    group counts and ``conflicts`` (one dict per conflicting group / bridged value)."""
    cfg = cfg or SplitSettings()
    previous = empty_assignments() if previous is None else previous
    out = df.copy()
    if "reason" not in out.columns:
        out["reason"] = None
    n = len(out)
    ds = dataset_mask(out)
    listing_codes, listings, group = group_listings(out, cfg.group_by)
    n_listings = len(listings)

    # previous split of each listing: -1 none
    prev_map = pd.Series(previous["split"].to_numpy(), index=previous["listing_id"].to_numpy())
    prev_map = prev_map[~prev_map.index.duplicated(keep="first")]
    prior_names = pd.Series(listings).map(prev_map)
    prior = np.full(n_listings, -1, dtype=np.int8)
    for code, name in enumerate(SPLITS):
        prior[(prior_names == name).to_numpy()] = code

    # per group: bit set of previous splits
    gbits = np.zeros(n_listings, dtype=np.int64)
    has_prior = prior >= 0
    np.bitwise_or.at(gbits, group[has_prior], (1 << prior[has_prior].astype(np.int64)))
    lbits = gbits[group]
    n_prior = _popcount3(lbits)
    listing_split = np.where(has_prior, prior, np.where(n_prior == 1, _bits_to_split(lbits), -1)).astype(np.int8)
    conflict_new = (~has_prior) & (n_prior >= 2)  # new listings bridging old splits

    # new groups with dataset rows
    classes = out["class_label"].to_numpy(dtype=object) if "class_label" in out.columns else np.full(n, None, object)
    new_listing = n_prior == 0
    row_new = ds & new_listing[listing_codes]
    if row_new.any():
        sub = pd.DataFrame({"g": group[listing_codes[row_new]], "c": classes[row_new]})
        sizes = sub.groupby(["g", "c"], sort=False).size().rename("n").reset_index()
        weight = sizes.groupby("g")["n"].sum()
        sizes = sizes.sort_values(["g", "n", "c"], ascending=[True, False, True])
        top = sizes.drop_duplicates("g", keep="first").set_index("g")
        g_ids = top.index.to_numpy(dtype=np.int64)
        old_rows = ds & (listing_split[listing_codes] >= 0)
        old_counts = (
            pd.DataFrame({"c": classes[old_rows], "s": np.asarray(SPLITS, dtype=object)[listing_split[listing_codes[old_rows]]]})
            .groupby(["c", "s"]).size().unstack(fill_value=0)
            if old_rows.any() else pd.DataFrame(columns=list(SPLITS))
        )
        codes = assign_new_groups(
            top["c"].to_numpy(dtype=object),
            weight.reindex(g_ids).to_numpy(),
            listings[g_ids],
            old_counts,
            cfg,
        )
        gsplit = np.full(n_listings, -1, dtype=np.int8)
        gsplit[g_ids] = codes
        listing_split = np.where(new_listing, gsplit[group], listing_split).astype(np.int8)

    # rows cut out: new listings of conflict groups, then values bridging two splits
    cut = conflict_new[listing_codes].copy()
    row_split = listing_split[listing_codes]
    conflicts: list[dict[str, Any]] = []
    if conflict_new.any():
        for g in np.unique(group[conflict_new])[:MAX_RECORDED]:
            members = np.flatnonzero(group == g)
            conflicts.append(
                {
                    "kind": "new_listing_joins_splits",
                    "group_key": str(listings[g]),
                    "old": {str(listings[i]): SPLITS[prior[i]] for i in members if prior[i] >= 0},
                    "dropped_listings": [str(listings[i]) for i in members if conflict_new[i]],
                }
            )
    for col in cfg.group_by:
        if col not in out.columns:
            continue
        sel = (~cut) & out[col].notna().to_numpy() & (row_split >= 0)
        if not sel.any():
            continue
        frame = pd.DataFrame({"k": out[col].to_numpy()[sel], "l": listing_codes[sel], "s": row_split[sel]})
        nun = frame.groupby("k")["s"].transform("nunique").to_numpy()
        if not (nun > 1).any():
            continue
        bad = frame[nun > 1]
        first = bad.sort_values(["k", "l"]).drop_duplicates("k").set_index("k")["s"]
        off = bad["s"].to_numpy() != first.reindex(bad["k"]).to_numpy()
        rows = np.flatnonzero(sel)[np.flatnonzero(nun > 1)[off]]
        cut[rows] = True
        for k, grp in list(bad.groupby("k"))[:MAX_RECORDED]:
            conflicts.append(
                {
                    "kind": f"{col}_spans_splits",
                    "value": str(k),
                    "kept_split": SPLITS[int(first[k])],
                    "cut_listings": sorted({str(listings[i]) for i in grp.loc[grp["s"] != first[k], "l"]}),
                }
            )

    status = out["status"].to_numpy(dtype=object).copy()
    reason = out["reason"].to_numpy(dtype=object).copy()
    drop = cut & (status == KEPT)
    status[drop] = DROPPED
    reason[drop] = SPLIT_CONFLICT
    ds = ds & ~cut
    split = np.full(n, None, dtype=object)
    assigned = ds & (row_split >= 0)
    split[assigned] = np.asarray(SPLITS, dtype=object)[row_split[assigned]]
    out["status"] = status
    out["reason"] = reason
    out["split"] = split
    out["split_group"] = listings[group[listing_codes]]
    out["split_conflict"] = cut

    # persist: every listing with a split that was not assigned before
    fresh = (listing_split >= 0) & ~has_prior
    added = pd.DataFrame(
        {
            "listing_id": listings[fresh],
            "split": np.asarray(SPLITS, dtype=object)[listing_split[fresh]],
            "group_key": listings[group[fresh]],
            "run": run,
        }
    )
    assignments = pd.concat([previous[list(ASSIGNMENT_COLUMNS)], added], ignore_index=True) if len(previous) else added
    info = {
        "listings": int(n_listings),
        "groups": int(len(np.unique(group))),
        "previous_listings": int(has_prior.sum()),
        "new_listings_assigned": int(fresh.sum()),
        "split_conflict_rows": int(drop.sum()),
        "conflicts": conflicts,
    }
    return out, assignments, info


# ---------------------------------------------------------------------------------------
# leakage check and report
# ---------------------------------------------------------------------------------------
def split_report(df: pd.DataFrame) -> pd.DataFrame:
    """Images per class and split, with ratios: columns train/val/test, total,
    train_frac/val_frac/test_frac (index: class)."""
    rows = df[df["split"].notna()] if len(df) else df
    counts = (
        rows.groupby(["class_label", "split"]).size().unstack(fill_value=0)
        if len(rows) else pd.DataFrame(columns=list(SPLITS))
    )
    counts = counts.reindex(columns=list(SPLITS), fill_value=0)
    counts["total"] = counts[list(SPLITS)].sum(axis=1)
    for s in SPLITS:
        counts[f"{s}_frac"] = (counts[s] / counts["total"].where(counts["total"] > 0)).round(4)
    counts.index.name = "class"
    return counts.sort_index()


def check_leakage(df: pd.DataFrame, group_by: Sequence[str] = ("dup_cluster", "image_id", "source_id")) -> pd.DataFrame:
    """Raise :class:`LeakageError` if a listing, a ``group_by`` value or a union-find
    group of listings holds rows of two splits; else return :func:`split_report`.

    A listing's split is the split of its dataset rows; all its other rows (dropped
    duplicates too) count as that split for the group_by values they carry. Rows with
    ``split_conflict`` are excluded (they were cut from the grouping on purpose)."""
    use = np.ones(len(df), dtype=bool)
    if "split_conflict" in df.columns:
        use = ~df["split_conflict"].fillna(False).astype(bool).to_numpy()
    sub = df[use]
    problems: list[str] = []
    has = sub["split"].notna()
    per_listing = sub.loc[has].groupby("listing_id")["split"].nunique()
    bad = per_listing[per_listing > 1]
    if len(bad):
        problems.append(f"{len(bad)} listing(s) span two splits, e.g. {list(bad.index[:5])}")
    first = sub.loc[has].drop_duplicates("listing_id").set_index("listing_id")["split"]
    lsplit = sub["listing_id"].map(first)
    for col in group_by:
        if col not in sub.columns:
            continue
        frame = pd.DataFrame({"k": sub[col], "s": lsplit}).dropna()
        nun = frame.groupby("k")["s"].nunique()
        bad = nun[nun > 1]
        if len(bad):
            problems.append(f"{len(bad)} {col} value(s) span two splits, e.g. {list(bad.index[:5])}")
    codes, listings, group = group_listings(sub, group_by)
    frame = pd.DataFrame({"g": group[codes], "s": lsplit.to_numpy()}).dropna()
    nun = frame.groupby("g")["s"].nunique()
    bad = nun[nun > 1]
    if len(bad):
        problems.append(
            f"{len(bad)} listing group(s) span two splits, e.g. groups of {[str(listings[g]) for g in bad.index[:5]]}"
        )
    if problems:
        raise LeakageError("split leakage: " + "; ".join(problems))
    return split_report(df)


# ---------------------------------------------------------------------------------------
# persistence (the exports live in tasks/export.py)
# ---------------------------------------------------------------------------------------
def read_assignments(store, key: str) -> pd.DataFrame:
    """The persisted assignments (empty if there are none yet)."""
    if not store.exists(key):
        return empty_assignments()
    df = pq.read_table(io.BytesIO(store.get(key))).to_pandas()
    missing = [c for c in ("listing_id", "split") if c not in df.columns]
    if missing:
        raise ValueError(f"{store.uri(key)}: assignments lack column(s) {missing}")
    for c in ASSIGNMENT_COLUMNS:
        if c not in df.columns:
            df[c] = None
    return df[list(ASSIGNMENT_COLUMNS)].astype(object)


def write_assignments(store, key: str, assignments: pd.DataFrame) -> str:
    table = pa.Table.from_pandas(assignments.astype(str).reset_index(drop=True), preserve_index=False)
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    store.put(key, sink.getvalue(), content_type="application/vnd.apache.parquet")
    return store.uri(key)


# ---------------------------------------------------------------------------------------
# Prefect tasks (thin). Not cached: the split depends on the persisted assignments (state)
# as much as on the manifest, and the reduce runs in seconds at 2M rows.
# ---------------------------------------------------------------------------------------
@task(name="assign-splits", retries=1)
def assign_splits_task(
    df: pd.DataFrame, previous: pd.DataFrame, config: dict[str, Any], run: str = ""
) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    return assign_splits(df, previous, SplitSettings(**config), run=run)


@task(name="leakage-check")
def check_leakage_task(df: pd.DataFrame, group_by: list[str]) -> pd.DataFrame:
    return check_leakage(df, group_by)
