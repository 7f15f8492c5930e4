"""Connected components over edge arrays (union-find without a Python loop per edge).

Used by dedup (duplicate clusters) and split (listing groups)."""

from __future__ import annotations

import numpy as np


def connected_components(n: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Component label of each of ``n`` nodes = the smallest node index in its component.

    Array-based union-find: every round hooks the larger root of each edge under the
    smaller one (``np.minimum.at``), then compresses every path fully (pointer jumping);
    edges already inside one component are dropped. Pointers only go to smaller indices,
    so there are no cycles; rounds are few (about log of the longest chain)."""
    index = np.int32 if n < 2**31 else np.int64  # half the work arrays' memory below 2^31 nodes
    parent = np.arange(n, dtype=index)
    u = np.asarray(u, dtype=index).ravel()
    v = np.asarray(v, dtype=index).ravel()
    keep = u != v
    u, v = u[keep], v[keep]
    while u.size:
        pu, pv = parent[u], parent[v]
        open_ = pu != pv
        if not open_.any():
            break
        u, v, pu, pv = u[open_], v[open_], pu[open_], pv[open_]
        np.minimum.at(parent, np.maximum(pu, pv), np.minimum(pu, pv))
        while True:
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent = grand
    return parent
