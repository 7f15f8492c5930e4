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
    parent = np.arange(n, dtype=np.int64)
    u = np.asarray(u, dtype=np.int64).ravel()
    v = np.asarray(v, dtype=np.int64).ravel()
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
