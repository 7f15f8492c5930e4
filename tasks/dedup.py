"""Dedup: one reduce step over the small hash table of the whole manifest.

Input: the manifest after fix + quality (one row per photo occurrence; no image bytes),
with ``image_id``, ``listing_id``, ``label``, ``width``, ``height``, ``status``,
``reason``, ``pixel_hash``, ``phash``, ``dhash`` (int64: the 64 hash bits viewed as
signed) and, when present, ``first_seen`` (else row order).

Only rows that are ``kept`` take part. Rows dropped by an earlier stage keep their
status and reason, and get nulls in the columns added here.

1. **Nodes** are the distinct ``image_id``s (same bytes = same node; a photo that occurs
   in several listings is one node with several rows).
2. **Exact duplicates by pixels**: nodes with the same ``pixel_hash`` (same decoded
   pixels, different bytes: re-saved with other metadata) are linked.
3. **Near duplicates**: nodes with equal ``phash`` are linked; then all pairs of
   *distinct* phash values within Hamming distance ``hamming_radius`` come from
   :func:`carflow.imagehash.hamming_pairs` (exact multi-index hashing, vectorised; no
   N×N matrix). With ``use_dhash`` a pair must also be within ``dhash_radius`` in dHash
   (the search then runs over distinct (phash, dhash) values). With ``confirm_thumb``
   every hash pair (equal hashes included) must also be within ``thumb_radius`` on the
   8×8 colour thumbnail (:func:`confirm_by_thumb`): the hashes see grey silhouettes, so
   two different cars in one pose on a white studio background matched them. A false
   merge costs two good photos, not one: the pair's labels conflict and a tie drops the
   representative too.
4. **Clusters**: connected components of those links (:func:`connected_components`,
   vectorised hook-to-minimum + pointer jumping). ``dup_cluster`` is the smallest
   ``image_id`` of the cluster (stable: it does not depend on sizes, dates or settings
   other than the radius). With ``linkage='leader'`` exact links stay transitive but a
   near duplicate only joins a cluster whose leader it is within the radius of
   (:func:`leader_clusters`): no chains. On 3,000 generated car photos at radius 8
   without dHash, union-find grew one cluster of 82 different photos from chained false
   pairs; ``use_dhash`` (default) brings the largest to 4. Chaining grows with the
   data: at a false-pair rate p, one image has about p·N false neighbours, and union-find
   percolates into a giant cluster once p·N > 1; the log warns about clusters of more
   than 1,000 images and :func:`dedup_stats` reports the largest.
5. **Placeholders**: a cluster whose rows span ≥ ``placeholder_min_listings`` distinct
   ``listing_id``s (dealer banners, "photo coming soon") → all its rows dropped, reason
   ``placeholder``.
6. **Representative** of every other cluster: the image with the largest
   ``width*height``, then the earliest ``first_seen``, then the smallest ``image_id``;
   of that image's rows the earliest occurrence (``first_seen``, ``listing_id``, row
   order). Exactly one row per cluster stays kept (``is_representative``); every other
   row, including the same photo's occurrences in other listings, is dropped with reason
   ``duplicate`` and ``dup_of`` = the representative's ``image_id``. The dropped rows
   keep their ``listing_id`` and label, so the split stage can still group by
   ``dup_cluster`` and the class stage can vote over the cluster's labels.
7. **Label conflict**: a non-placeholder cluster whose rows carry ≥ 2 distinct non-null
   labels gets ``label_conflict=True`` on all its rows; nothing is dropped for it (the
   class stage decides, see ``classes.conflict_policy``).

Added columns: ``dup_cluster`` (str), ``dup_of`` (str | None), ``is_representative``
(boolean), ``label_conflict`` (boolean), ``cluster_listings`` (Int64).

Hash columns must hold exact 64-bit integers: ``int64``/``Int64``/``uint64``, Arrow
int64, or Python ints in an object column. A ``float64`` column (what
``pyarrow.Table.to_pandas()`` makes of an int64 column with nulls) has lost the low bits
of every hash and is rejected with a message saying how to read it instead.

Choice of radius: ``hamming_radius=8`` with ``use_dhash`` (the table used dHash ≤ 10; the
default is now ≤ 7, see ``DedupSettings.dhash_radius`` for why), measured with
``bench/near_dup.py --tune --photos 300 --negatives 3000`` on generated car photos hashed
as the pipeline hashes them (draft decode → grey → Lanczos 32×32):

======  ===========  ========  =================  ===============================
radius  edits caught  re-shot   different photos   largest cluster of different
        (pH / +dH)    merged    merged (pH / +dH)  photos, union-find (pH / +dH)
======  ===========  ========  =================  ===============================
4       80.8 / 80.2%  0%        15 / 2 pairs       3 / 2
6       87.0 / 86.0%  0%        105 / 8            8 / 3
8       91.2 / 90.1%  0%        434 / 23           82 / 4
10      94.6 / 93.5%  0.3 / 0%  1703 / 57          852 / 4
12      96.7 / 95.5%  2 / 0%    5481 / 145         1979 / 12
======  ===========  ========  =================  ===============================

(4.5M different-photo pairs; edits = JPEG q60, 90 % and 50 % resize, 3 % crop,
+10 % brightness, blur, a corner watermark box.) Re-encodes, resizes, blur and
brightness stay within pHash 6 (always caught); crops (median 4, max 14) and the opaque
watermark box (median 10) are what a larger radius buys. pHash distances are always
even (32 of the 64 bits are set whenever the coefficients are distinct), so radius 8 and
9 are the same. Radius 8 is
where the pHash-only false pairs start to chain (largest false cluster 8 → 82); dHash
confirmation removes ~95 % of them for ~1 % of the edits. Caveat for scale: even 23
false pairs in 4.5M (5e-6 per pair) would give each image ~5 false neighbours among 1M
images of this kind, enough for union-find to percolate. These generated photos all
share one layout (sky, ground, one car), so real listings should do better, but measure
the rate on real data before a 1M-image run (``dedup_stats``' ``largest_cluster_images``
is the symptom), and prefer ``linkage='leader'`` if it is high.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from carflow.graph import connected_components
from carflow.imagehash import THUMB_SIDE, hamming_pairs, popcount64, thumb_distance
from carflow.manifest import DROPPED, KEPT, fixed_width_values
from carflow.settings import DedupSettings, as_settings

log = logging.getLogger(__name__)

DUPLICATE = "duplicate"
PLACEHOLDER = "placeholder"
COLUMNS = ("dup_cluster", "dup_of", "is_representative", "label_conflict", "cluster_listings")
#: a cluster of more distinct images than this is logged as suspicious (chained near pairs)
LARGE_CLUSTER = 1000


def as_dedup_settings(cfg: Any = None) -> DedupSettings:
    """``cfg`` (None, a dict or a settings model) as :class:`DedupSettings`."""
    return as_settings(DedupSettings, cfg)


# ---------------------------------------------------------------------------------------
# building blocks
# ---------------------------------------------------------------------------------------
def leader_clusters(group: np.ndarray, u: np.ndarray, v: np.ndarray, rank: np.ndarray) -> np.ndarray:
    """Greedy leader ("star") clustering of groups linked by near pairs ``(u, v)``.

    ``group``: each node's exact-duplicate group (a node index; from
    :func:`connected_components`); ``rank``: each node's priority (0 = best). Groups are
    visited best first; an unassigned group becomes a leader and takes every unassigned
    group it has a near pair with. Returns each node's cluster label = the smallest node
    index in its cluster. A Python loop over the groups that have near pairs (each step a
    few small numpy operations)."""
    k = group.size
    gu, gv = group[np.asarray(u, np.int64)], group[np.asarray(v, np.int64)]
    keep = gu != gv
    gu, gv = gu[keep], gv[keep]
    if gu.size == 0:
        return group
    grank = np.full(k, np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(grank, group, rank)
    src = np.concatenate([gu, gv])
    dst = np.concatenate([gv, gu])
    order = np.argsort(src, kind="stable")
    src, dst = src[order], dst[order]
    heads, start, count = np.unique(src, return_index=True, return_counts=True)
    visit = np.argsort(grank[heads], kind="stable")
    leader = np.full(k, -1, dtype=np.int64)
    for h, s0, c in zip(heads[visit].tolist(), start[visit].tolist(), count[visit].tolist(), strict=True):
        if leader[h] >= 0:
            continue
        leader[h] = h
        nb = dst[s0 : s0 + c]
        leader[nb[leader[nb] < 0]] = h
    lead = np.where(leader >= 0, leader, np.arange(k))
    raw = lead[group]
    smallest = np.full(k, k, dtype=np.int64)
    np.minimum.at(smallest, raw, np.arange(k))
    return smallest[raw]


def _first_of_group(codes: np.ndarray) -> np.ndarray:
    """For each element, the index of the first element with the same code."""
    _, first, inverse = np.unique(codes, return_index=True, return_inverse=True)
    return first[inverse]


def _distinct_per_group(group: np.ndarray, n_groups: int, codes: np.ndarray) -> np.ndarray:
    """Number of distinct non-negative ``codes`` per group (negative codes = null)."""
    ok = codes >= 0
    if not ok.any():
        return np.zeros(n_groups, dtype=np.int64)
    span = int(codes.max()) + 1
    pairs = np.unique(group[ok].astype(np.int64) * span + codes[ok])
    return np.bincount(pairs // span, minlength=n_groups)


def hash_column(series: pd.Series, name: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A 64-bit hash column → ``(uint64 values, valid mask)``; nulls give ``valid=False``."""
    name = name or str(series.name)
    n = len(series)
    dtype = series.dtype
    if n == 0:
        return np.zeros(0, np.uint64), np.zeros(0, bool)
    valid = series.notna().to_numpy()
    if pd.api.types.is_float_dtype(dtype):
        if not valid.any():
            return np.zeros(n, np.uint64), valid
        raise TypeError(
            f"dedup: column {name!r} is {dtype}: 64-bit hashes do not fit a float (the low bits are "
            "lost). Read the manifest with integer nulls preserved, e.g. "
            "table.to_pandas(types_mapper={pa.int64(): pd.Int64Dtype()}.get), or keep it object/Int64."
        )
    if pd.api.types.is_integer_dtype(dtype):
        signed = not str(dtype).lower().startswith("uint")
        arr = np.asarray(series.to_numpy(dtype=np.int64 if signed else np.uint64, na_value=0))
        return (arr.view(np.uint64) if signed else arr), valid
    # object (Python ints / None) or another extension type: element by element
    out = np.zeros(n, np.uint64)
    mask = (1 << 64) - 1
    for k, val in enumerate(series.to_numpy(dtype=object)):
        if valid[k]:
            if not isinstance(val, (int, np.integer)) or isinstance(val, bool):
                raise TypeError(
                    f"dedup: column {name!r} holds {type(val).__name__} {val!r}; 64-bit hashes must be ints"
                )
            out[k] = int(val) & mask
    return out, valid


def near_duplicate_edges(
    node_phash: np.ndarray,
    node_dhash: np.ndarray | None,
    valid: np.ndarray,
    cfg: DedupSettings,
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """``((same_u, same_v), (near_u, near_v))``: nodes with equal hash values linked to
    the first node with that value, and the first nodes of distinct values within the
    radius (exact MIH search over the distinct values)."""
    nodes = np.flatnonzero(valid)
    if nodes.size < 2:
        e = np.empty(0, np.int64)
        return (e, e.copy()), (e.copy(), e.copy())
    ph = node_phash[nodes]
    if cfg.use_dhash:
        assert node_dhash is not None
        dh = node_dhash[nodes]
        keys = np.stack([ph, dh], axis=1)
        uk, first, inverse = np.unique(keys, axis=0, return_index=True, return_inverse=True)
        u_ph, u_dh = uk[:, 0], uk[:, 1]
    else:
        u_ph, first, inverse = np.unique(ph, return_index=True, return_inverse=True)
        u_dh = None
    inverse = inverse.ravel()
    # same value → linked to the value's first node
    same_u, same_v = nodes, nodes[first[inverse]]
    # distinct values within the radius
    t0 = time.perf_counter()
    i, j = hamming_pairs(u_ph, cfg.hamming_radius)
    if u_dh is not None and i.size:
        dh_dist = popcount64(u_dh[i] ^ u_dh[j])
        ok = dh_dist <= cfg.dhash_radius
        # identical pHashes are strong evidence on their own: allow more dHash drift
        # (a resize shifts the coarse 9×8 dHash gradients more than the pHash DCT)
        ok |= (u_ph[i] == u_ph[j]) & (dh_dist <= cfg.dhash_radius_same_phash)
        i, j = i[ok], j[ok]
    log.info(
        "dedup: %d distinct hashes, %d near pairs within radius %d (%.2fs)",
        u_ph.size,
        i.size,
        cfg.hamming_radius,
        time.perf_counter() - t0,
    )
    rep = nodes[first]
    keep = same_u != same_v
    return (same_u[keep], same_v[keep]), (rep[i], rep[j])


#: hash pairs compared per step in :func:`confirm_by_thumb` (its float32 work arrays take
#: about 4 KB per pair: a step of 4,096 pairs stays near 16 MB, whatever the corpus size)
THUMB_PAIRS_PER_STEP = 4096


#: bytes of one colour thumbnail (:func:`carflow.imagehash.colour_thumb`)
THUMB_BYTES = 3 * THUMB_SIDE**2


def thumb_matrix(thumbs: Any, nodes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The thumbnails of ``nodes`` as a ``(len(nodes), THUMB_BYTES)`` uint8 matrix (zero
    rows where a node has none) and the mask of nodes that have one. ``thumbs`` is an
    object array of bytes (the pandas path) or :class:`_ArrowThumbs` (read from the Arrow
    buffers, no Python object per thumbnail)."""
    if isinstance(thumbs, _ArrowThumbs):
        return thumbs.matrix(nodes)
    values = thumbs[nodes]
    has = np.array([isinstance(t, (bytes, bytearray)) and len(t) == THUMB_BYTES for t in values], dtype=bool)
    flat = np.zeros((len(nodes), THUMB_BYTES), np.uint8)
    if has.any():
        flat[has] = np.frombuffer(b"".join(values[has]), np.uint8).reshape(-1, THUMB_BYTES)
    return flat, has


def confirm_by_thumb(
    thumbs: Any, u: np.ndarray, v: np.ndarray, radius: float, step: int = THUMB_PAIRS_PER_STEP,
    known: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Keep the hash pairs ``(u, v)`` whose colour thumbnails (192-byte ``thumb`` values
    per node, :func:`carflow.imagehash.colour_thumb`; read with :func:`thumb_matrix`) are
    within ``radius`` (:func:`carflow.imagehash.thumb_distance`). pHash and dHash see grey
    silhouettes only: two different cars in the same pose on a white background pass
    both. A pair where either node has no thumbnail (a manifest from before the column)
    is kept, and so is a pair marked in ``known`` (the same pixels: nothing to confirm).

    Only the thumbnails of nodes in a pair still to check are read, and the distances are
    computed ``step`` pairs at a time: a corpus of re-posted photos has about one pair per
    image, and all pairs at once took ~4 KB of RSS each (``bench/memory.py``)."""
    keep = np.ones(u.size, dtype=bool)
    todo = np.arange(u.size) if known is None else np.flatnonzero(~known)
    if todo.size:
        need = np.unique(np.concatenate([u[todo], v[todo]]))
        flat, has = thumb_matrix(thumbs, need)
        pu, pv = np.searchsorted(need, u[todo]), np.searchsorted(need, v[todo])
        check = np.flatnonzero(has[pu] & has[pv])
        for start in range(0, check.size, step):
            part = check[start : start + step]
            keep[todo[part]] = thumb_distance(flat[pu[part]], flat[pv[part]]) <= radius
    dropped = int((~keep).sum())
    if dropped:
        log.info("dedup: %d hash pair(s) not confirmed by the colour thumbnail (radius %.1f)", dropped, radius)
    return u[keep], v[keep]


# ---------------------------------------------------------------------------------------
# the stage
# ---------------------------------------------------------------------------------------
@dataclass
class _Clusters:
    """The clustering of the kept rows (arrays over the kept rows, node = distinct image)."""

    row_comp: np.ndarray  # each row's cluster label: the cluster's smallest node
    row_rep_node: np.ndarray  # the node of each row's cluster representative
    rep_row: np.ndarray  # the row stays kept as its cluster's representative
    placeholder: np.ndarray
    dropped_dup: np.ndarray
    conflict: np.ndarray
    n_listings: np.ndarray
    n_clusters: int


def _cluster_rows(node_of_row: np.ndarray, k: int, first_seen: np.ndarray, area: np.ndarray,
                  listing_rank: np.ndarray, label_code: np.ndarray, pixel_code: np.ndarray | None,
                  hashes: tuple[np.ndarray, np.ndarray | None, np.ndarray] | None, thumbs: Any,
                  cfg: DedupSettings) -> _Clusters:
    """Steps 2-7 of the module docstring over plain arrays, the same for a DataFrame
    (:func:`dedup_manifest`) and an Arrow table (:func:`dedup_table`). Per kept row:
    ``node_of_row`` (nodes numbered in ``image_id`` order), ``first_seen``, ``area``,
    ``listing_rank`` (listing ids numbered in their sort order), ``label_code`` (-1:
    none). Per node: ``pixel_code`` (-1: none), ``hashes`` = ``(phash, dhash, valid)``
    as uint64, ``thumbs`` (``thumbs[nodes]`` → object array of bytes or None)."""
    node_area = np.full(k, -np.inf)
    np.maximum.at(node_area, node_of_row, area)
    node_first = np.full(k, np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(node_first, node_of_row, first_seen)

    us, vs = [], []
    if pixel_code is not None:
        ok = pixel_code >= 0
        if ok.any():
            nodes = np.flatnonzero(ok)
            us.append(nodes)
            vs.append(nodes[_first_of_group(pixel_code[ok])])
    if hashes is not None:
        ph, dh, ph_ok = hashes
        (su, sv), (nu, nv) = near_duplicate_edges(ph, dh, ph_ok, cfg)
        if cfg.confirm_thumb and thumbs is not None:
            # an equal-hash pair of one pixel group is linked by its pixel edges anyway
            known = None if pixel_code is None else (pixel_code[su] >= 0) & (pixel_code[su] == pixel_code[sv])
            su, sv = confirm_by_thumb(thumbs, su, sv, cfg.thumb_radius, known=known)
            nu, nv = confirm_by_thumb(thumbs, nu, nv, cfg.thumb_radius)
        us.append(su)
        vs.append(sv)
    else:
        nu = nv = np.empty(0, np.int64)
    u = np.concatenate(us) if us else np.empty(0, np.int64)
    v = np.concatenate(vs) if vs else np.empty(0, np.int64)
    if cfg.linkage == "single":
        comp = connected_components(k, np.concatenate([u, nu]), np.concatenate([v, nv]))
    else:
        rank = np.empty(k, dtype=np.int64)
        rank[np.lexsort((np.arange(k), node_first, -node_area))] = np.arange(k)
        comp = leader_clusters(connected_components(k, u, v), nu, nv, rank)
    # comp: label = smallest node = smallest image_id of the cluster

    # representative image per cluster: largest area, earliest, smallest image_id
    order = np.lexsort((np.arange(k), node_first, -node_area, comp))
    first_in_comp = np.ones(k, dtype=bool)
    first_in_comp[1:] = comp[order][1:] != comp[order][:-1]
    rep_node_of_comp = np.full(k, -1, dtype=np.int64)
    rep_node_of_comp[comp[order][first_in_comp]] = order[first_in_comp]

    row_comp = comp[node_of_row]
    row_rep_node = rep_node_of_comp[row_comp]
    # representative row: the representative image's earliest occurrence
    cand = np.flatnonzero(node_of_row == row_rep_node)
    cand = cand[np.lexsort((cand, listing_rank[cand], first_seen[cand], row_comp[cand]))]
    lead = np.ones(cand.size, dtype=bool)
    lead[1:] = row_comp[cand][1:] != row_comp[cand][:-1]
    rep_row = np.zeros(node_of_row.size, dtype=bool)
    rep_row[cand[lead]] = True

    n_listings = _distinct_per_group(row_comp, k, listing_rank)[row_comp]
    n_labels = _distinct_per_group(row_comp, k, label_code)[row_comp]

    placeholder = n_listings >= cfg.placeholder_min_listings
    rep_row &= ~placeholder
    return _Clusters(row_comp, row_rep_node, rep_row, placeholder, ~placeholder & ~rep_row,
                     (n_labels >= 2) & ~placeholder, n_listings, int(np.unique(comp).size))


def _log_done(c: _Clusters, rows: int, k: int, t0: float) -> None:
    log.info("dedup: %d kept rows, %d images, %d clusters; dropped %d duplicate, %d placeholder rows (%.2fs)",
             rows, k, c.n_clusters, int(c.dropped_dup.sum()), int(c.placeholder.sum()), time.perf_counter() - t0)


def dedup_manifest(df: pd.DataFrame, cfg: Any = None) -> pd.DataFrame:
    """Cluster exact and near duplicates over the kept rows of ``df``, drop all but one
    row per cluster (reason ``duplicate``) and whole placeholder clusters (reason
    ``placeholder``), flag label conflicts. Returns a new DataFrame (same index and row
    order) with the columns listed in the module docstring. :func:`dedup_table` does the
    same over an Arrow table (the clean stage's reduce)."""
    cfg = as_dedup_settings(cfg)
    t0 = time.perf_counter()
    out = df.copy()
    n = len(out)
    if "reason" not in out.columns:
        out["reason"] = None
    active = (out["status"] == KEPT).to_numpy(dtype=bool, na_value=False)
    rows = np.flatnonzero(active)

    dup_cluster = np.full(n, None, dtype=object)
    dup_of = np.full(n, None, dtype=object)
    is_rep = pd.array([pd.NA] * n, dtype="boolean")
    conflict = pd.array([pd.NA] * n, dtype="boolean")
    listings = pd.array([pd.NA] * n, dtype="Int64")

    if rows.size:
        sub = out.iloc[rows]
        image_ids = sub["image_id"].astype(str).to_numpy(dtype=object)
        uniq, first_row, node_of_row = np.unique(image_ids, return_index=True, return_inverse=True)
        # node order = image_id order; first_row: each node's first row (its hashes: same bytes)
        node_of_row = node_of_row.ravel()
        k = uniq.size

        if "first_seen" in sub.columns and sub["first_seen"].notna().all():
            first_seen = sub["first_seen"].to_numpy(dtype=np.int64)
        else:
            first_seen = rows.astype(np.int64)
        w = pd.to_numeric(sub["width"], errors="coerce").to_numpy(dtype=float, na_value=np.nan)
        h = pd.to_numeric(sub["height"], errors="coerce").to_numpy(dtype=float, na_value=np.nan)
        area = np.nan_to_num(w * h, nan=-1.0)

        pixel_code = None
        if "pixel_hash" in sub.columns:
            pix = sub["pixel_hash"].iloc[first_row]
            pixel_code = np.full(k, -1, dtype=np.int64)
            ok = pix.notna().to_numpy()
            pixel_code[ok] = pd.factorize(pix[ok].astype(str))[0]
        hashes = thumbs = None
        if "phash" in sub.columns:
            ph, ph_ok = hash_column(sub["phash"].iloc[first_row], "phash")
            dh = None
            if cfg.use_dhash:
                dh, dh_ok = hash_column(sub["dhash"].iloc[first_row], "dhash")
                ph_ok = ph_ok & dh_ok
            hashes = (ph, dh, ph_ok)
            if "thumb" in sub.columns:
                thumbs = sub["thumb"].iloc[first_row].to_numpy(dtype=object)
        listing_rank = np.unique(sub["listing_id"].astype(str).to_numpy(dtype=object), return_inverse=True)[1].ravel()
        labels = sub["label"] if "label" in sub.columns else pd.Series([None] * rows.size)
        label_code = pd.factorize(labels)[0]  # NaN → -1

        c = _cluster_rows(node_of_row, k, first_seen, area, listing_rank, label_code, pixel_code, hashes, thumbs,
                          cfg)
        dup_cluster[rows] = uniq[c.row_comp]
        dup_of[rows] = np.where(c.dropped_dup, uniq[c.row_rep_node], None)
        is_rep[rows] = c.rep_row
        conflict[rows] = c.conflict
        listings[rows] = c.n_listings

        status = out["status"].to_numpy(dtype=object).copy()
        reason = out["reason"].to_numpy(dtype=object).copy()
        status[rows[c.placeholder]] = DROPPED
        reason[rows[c.placeholder]] = PLACEHOLDER
        status[rows[c.dropped_dup]] = DROPPED
        reason[rows[c.dropped_dup]] = DUPLICATE
        out["status"] = pd.Series(status, index=out.index)
        out["reason"] = pd.Series(reason, index=out.index)
        _log_done(c, rows.size, k, t0)

    out["dup_cluster"] = pd.Series(dup_cluster, index=out.index)
    out["dup_of"] = pd.Series(dup_of, index=out.index)
    out["is_representative"] = pd.Series(is_rep, index=out.index)
    out["label_conflict"] = pd.Series(conflict, index=out.index)
    out["cluster_listings"] = pd.Series(listings, index=out.index)
    return out


# ---------------------------------------------------------------------------------------
# the same over an Arrow table: no pandas frame, no Python object per row
# ---------------------------------------------------------------------------------------
#: the types of the columns dedup adds
COLUMN_TYPES = {"dup_cluster": pa.string(), "dup_of": pa.string(), "is_representative": pa.bool_(),
                "label_conflict": pa.bool_(), "cluster_listings": pa.int64()}


def _take(table: pa.Table, name: str, idx: pa.Array) -> pa.Array:
    col = table[name].take(idx)
    return col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col


def _as_str(arr: pa.Array) -> pa.Array:
    """Strings as :func:`dedup_manifest` sees them (``astype(str)``: a null is ``"None"``)."""
    if not pa.types.is_string(arr.type):
        arr = arr.cast(pa.string())
    return pc.fill_null(arr, "None") if arr.null_count else arr


def _sorted_codes(arr: pa.Array) -> tuple[pa.Array, np.ndarray]:
    """The distinct values of ``arr`` in sort order, and each element's position among them
    (content ids: sorted in NumPy, :func:`carflow.manifest.fixed_width_values`)."""
    values = fixed_width_values(arr)
    if values is not None:
        uniq_np, inverse = np.unique(values, return_inverse=True)
        return pa.array(uniq_np).cast(pa.string()), inverse.ravel().astype(np.int64)
    uniq = pc.unique(arr)
    uniq = uniq.take(pc.array_sort_indices(uniq))
    return uniq, pc.index_in(arr, value_set=uniq).to_numpy(zero_copy_only=False).astype(np.int64)


#: elements compared per step where a sorted copy of content ids is avoided
_BLOCK = 1 << 16


def _fixed_inverse(values: np.ndarray, rows: np.ndarray | None = None) -> tuple[int, np.ndarray]:
    """``(k, inverse)`` of a NumPy array (content ids: ``S<width>``), or of its elements
    at ``rows``: the number of distinct values and each element's position among them in
    sort order, through an argsort compared a block at a time: no sorted copy, no copy of
    the rows' values and no array of the distinct values (``np.unique`` made all three:
    19 MB per 100k ids, at the clean reduce's peak)."""
    perm = np.argsort(values, kind="stable")
    if rows is not None:
        wanted = np.zeros(values.size, dtype=bool)
        wanted[rows] = True
        perm = perm[wanted[perm]]
        del wanted
    new = np.ones(perm.size, dtype=bool)
    for start in range(1, perm.size, _BLOCK):
        b = perm[start - 1 : start + _BLOCK]
        new[start : start + b.size - 1] = values[b[1:]] != values[b[:-1]]
    codes = np.cumsum(new) - 1
    inverse = np.empty(values.size, dtype=np.int64)
    inverse[perm] = codes
    return (int(codes[-1]) + 1 if codes.size else 0), (inverse if rows is None else inverse[rows])


def _sorted_inverse(arr: pa.Array) -> tuple[int, np.ndarray]:
    """``(k, inverse)`` of an Arrow column (:func:`_fixed_inverse` for content ids)."""
    values = fixed_width_values(arr)
    if values is None:
        uniq, inverse = _sorted_codes(arr)
        return len(uniq), inverse
    return _fixed_inverse(values)


def _codes(arr: pa.Array) -> np.ndarray:
    """Equal values → equal codes ≥ 0, nulls → -1 (content hashes: sorted in NumPy)."""
    values = fixed_width_values(arr)
    if values is not None:
        return _fixed_inverse(values)[1]
    return pc.fill_null(pc.dictionary_encode(arr).indices, -1).to_numpy(zero_copy_only=False).astype(np.int64)


def value_codes(arr: pa.Array | pa.ChunkedArray) -> pa.Array:
    """Equal values → equal int64 codes, nulls stay null: all that dedup compares of a
    content-hash column (``pixel_hash``), 8 bytes a row in place of a 64-character string
    (the clean reduce codes it before it builds dedup's narrow table)."""
    valid = pc.is_valid(arr).to_numpy(zero_copy_only=False)
    codes = np.full(len(arr), -1, dtype=np.int64)
    values = fixed_width_values(arr, skip_nulls=True)
    if values is not None:
        codes[valid] = _fixed_inverse(values)[1]
    elif valid.any():
        codes[valid] = _codes(pc.drop_null(arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr))
    return pa.array(codes, pa.int64(), mask=None if valid.all() else ~valid)


def _hash_values(arr: pa.Array, name: str) -> tuple[np.ndarray, np.ndarray]:
    """An Arrow 64-bit hash column → ``(uint64 values, valid mask)`` (as :func:`hash_column`)."""
    valid = pc.is_valid(arr).to_numpy(zero_copy_only=False)
    if pa.types.is_null(arr.type) or not valid.any():
        return np.zeros(len(arr), np.uint64), valid
    if not pa.types.is_integer(arr.type):
        raise TypeError(f"dedup: column {name!r} is {arr.type}: 64-bit hashes must be integers")
    signed = pa.types.is_signed_integer(arr.type)
    values = pc.fill_null(arr.cast(pa.int64() if signed else pa.uint64()), 0).to_numpy(zero_copy_only=False)
    return (values.view(np.uint64) if signed else values), valid


class _ArrowThumbs:
    """The thumbnails of nodes, read from an Arrow binary column only for the nodes asked
    for (:func:`thumb_matrix`)."""

    def __init__(self, column: pa.ChunkedArray, node_rows: np.ndarray):
        self.column, self.node_rows = column, node_rows

    def matrix(self, nodes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        taken = self.column.take(pa.array(self.node_rows[nodes]))
        arr = taken.combine_chunks() if isinstance(taken, pa.ChunkedArray) else taken
        if not pa.types.is_binary(arr.type):
            arr = arr.cast(pa.binary())
        n = len(arr)
        if arr.null_count == n:  # no thumbnail at all (a null-typed column, say)
            return np.zeros((n, THUMB_BYTES), np.uint8), np.zeros(n, dtype=bool)
        offsets = np.frombuffer(arr.buffers()[1], np.int32)[arr.offset : arr.offset + n + 1].astype(np.int64)
        valid = pc.is_valid(arr).to_numpy(zero_copy_only=False)
        has = valid & (np.diff(offsets) == THUMB_BYTES)
        data = np.frombuffer(arr.buffers()[2], np.uint8) if arr.buffers()[2] is not None else np.empty(0, np.uint8)
        if n and has.all():  # the usual case: one contiguous block, no copy
            return data[offsets[0] : offsets[-1]].reshape(n, THUMB_BYTES), has
        flat = np.zeros((n, THUMB_BYTES), np.uint8)
        rows = np.flatnonzero(has)
        for start in range(0, rows.size, THUMB_PAIRS_PER_STEP):
            part = rows[start : start + THUMB_PAIRS_PER_STEP]
            flat[part] = data[offsets[part][:, None] + np.arange(THUMB_BYTES)]
        return flat, has


def _scatter(n: int, rows: np.ndarray, values: np.ndarray, type_: pa.DataType) -> pa.Array:
    """An array of ``n`` nulls with ``values`` at ``rows``."""
    out = np.zeros(n, dtype=values.dtype)
    out[rows] = values
    mask = np.ones(n, dtype=bool)
    mask[rows] = False
    return pa.array(out, type_, mask=mask)


def dedup_table(table: pa.Table, cfg: Any = None, thumbs: Any = None) -> pa.Table:
    """:func:`dedup_manifest` over an Arrow table (the clean stage's reduce): the same
    rules, the same ``status``, ``reason`` and added columns (:data:`COLUMN_TYPES`), row
    order unchanged. Strings stay in Arrow: no pandas frame and no Python object per row
    (the pandas path held about 1 KB per row of object columns: ``bench/memory.py``).
    ``thumbs`` stands in for a ``thumb`` column: anything with the table's rows and
    ``take(rows)`` (:class:`tasks.shards.TakenColumn`, read only for the nodes compared)."""
    from tasks.shards import put_column

    cfg = as_dedup_settings(cfg)
    thumb_column, thumbs = thumbs, None
    t0 = time.perf_counter()
    n = table.num_rows
    names = set(table.column_names)
    status = table["status"]
    reason = table["reason"].cast(pa.string()) if "reason" in names else pa.nulls(n, pa.string())
    active = pc.fill_null(pc.equal(status, KEPT), False).to_numpy(zero_copy_only=False)
    rows = np.flatnonzero(active)
    added = {name: pa.nulls(n, t) for name, t in COLUMN_TYPES.items()}
    if rows.size:
        kept = pa.array(rows)
        ids = fixed_width_values(table["image_id"])
        if ids is not None:  # content ids: sorted through a view of the column
            k, node_of_row = _fixed_inverse(ids, rows)
        else:
            k, node_of_row = _sorted_inverse(_as_str(_take(table, "image_id", kept)))
        del ids
        first_row = np.full(k, rows.size, dtype=np.int64)
        np.minimum.at(first_row, node_of_row, np.arange(rows.size))
        node_rows = rows[first_row]
        first_seen = _take(table, "first_seen", kept) if "first_seen" in names else None
        if first_seen is not None and first_seen.null_count == 0:
            first_seen = first_seen.to_numpy(zero_copy_only=False).astype(np.int64)
        else:
            first_seen = rows.astype(np.int64)
        w, h = (_take(table, c, kept).cast(pa.float64()).to_numpy(zero_copy_only=False) for c in ("width", "height"))
        area = np.nan_to_num(w * h, nan=-1.0)
        at_nodes = pa.array(node_rows)
        pixel_code = _codes(_take(table, "pixel_hash", at_nodes)) if "pixel_hash" in names else None
        hashes = thumbs = None
        if "phash" in names:
            ph, ph_ok = _hash_values(_take(table, "phash", at_nodes), "phash")
            dh = None
            if cfg.use_dhash:
                dh, dh_ok = _hash_values(_take(table, "dhash", at_nodes), "dhash")
                ph_ok = ph_ok & dh_ok
            hashes = (ph, dh, ph_ok)
            if "thumb" in names or thumb_column is not None:
                thumbs = _ArrowThumbs(table["thumb"] if thumb_column is None else thumb_column, node_rows)
        listing_rank = _sorted_codes(_as_str(_take(table, "listing_id", kept)))[1]
        label_code = _codes(_take(table, "label", kept)) if "label" in names else np.full(rows.size, -1)

        c = _cluster_rows(node_of_row, k, first_seen, area, listing_rank, label_code, pixel_code, hashes, thumbs,
                          cfg)
        # the work arrays go before the output columns are made (the reduce's peak)
        del node_of_row, first_seen, w, h, area, listing_rank, label_code, pixel_code, hashes, thumbs
        dup = np.zeros(n, dtype=bool)
        dup[rows[c.dropped_dup]] = True
        held = np.zeros(n, dtype=bool)
        held[rows[c.placeholder]] = True
        status = pc.if_else(pa.array(dup | held), DROPPED, status)
        reason = pc.if_else(pa.array(held), PLACEHOLDER, pc.if_else(pa.array(dup), DUPLICATE, reason))
        added = {
            # a node's id is the image_id of its first row (node_rows), not a second array of ids
            "dup_cluster": _take(table, "image_id", at_nodes.take(_scatter(n, rows, c.row_comp, pa.int64()))),
            "dup_of": _take(table, "image_id", at_nodes.take(
                _scatter(n, rows[c.dropped_dup], c.row_rep_node[c.dropped_dup], pa.int64()))),
            "is_representative": _scatter(n, rows, c.rep_row, pa.bool_()),
            "label_conflict": _scatter(n, rows, c.conflict, pa.bool_()),
            "cluster_listings": _scatter(n, rows, c.n_listings.astype(np.int64), pa.int64()),
        }
        _log_done(c, rows.size, k, t0)
    table = put_column(put_column(table, "status", status), "reason", reason)
    for name, values in added.items():
        table = put_column(table, name, values)
    return table


def dedup_stats(df: pd.DataFrame) -> dict[str, Any]:
    """Counters of a deduplicated manifest: rows, kept, dropped rows per reason (all
    stages), rows dropped here (``duplicate``, ``placeholder``), clusters, clusters with
    more than one distinct image, and label conflicts."""
    dropped = df["status"] == DROPPED
    reasons = Counter(df.loc[dropped, "reason"].fillna("unknown").tolist())
    clustered = df[df["dup_cluster"].notna()] if "dup_cluster" in df.columns else df.iloc[:0]
    images_per_cluster = clustered.groupby("dup_cluster")["image_id"].nunique()
    conflict = (
        clustered["label_conflict"].fillna(False).astype(bool)
        if len(clustered)
        else pd.Series([], dtype=bool)
    )
    return {
        "rows": int(len(df)),
        "kept": int((df["status"] == KEPT).sum()),
        "dropped_by_reason": dict(sorted(reasons.items())),
        DUPLICATE: int(reasons.get(DUPLICATE, 0)),
        PLACEHOLDER: int(reasons.get(PLACEHOLDER, 0)),
        "clusters": int(images_per_cluster.size),
        "multi_image_clusters": int((images_per_cluster > 1).sum()),
        "largest_cluster_images": int(images_per_cluster.max()) if images_per_cluster.size else 0,
        "label_conflict_rows": int(conflict.sum()),
        "label_conflict_clusters": int(clustered.loc[conflict.to_numpy(), "dup_cluster"].nunique())
        if len(clustered)
        else 0,
    }
