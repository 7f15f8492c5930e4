"""Benchmark: grouping + splitting + leakage check over a large synthetic manifest.

    .venv/bin/python bench/split.py [--rows 2000000] [--photos 4] [--classes 200]
                                    [--dup 0.02] [--grow 0.1] [--tracemalloc]

Builds ``rows`` manifest rows (``rows / photos`` listings, ``classes`` classes, a share
``dup`` of rows re-using another listing's dup cluster), then times
:func:`tasks.split.assign_splits` (union-find grouping + stratified hash split), the
leakage check, and a second assignment after ``grow`` new listings (with the first
run's assignments kept). Prints seconds per step and peak memory: peak RSS of the
process (``ru_maxrss``) and, with ``--tracemalloc``, the Python-tracked peak (numpy
buffers included; tracing slows the run). Target: < 60 s and < 4 GB at 2M rows.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.split import assign_splits, check_leakage  # noqa: E402


def synthetic(n_rows: int, photos: int, n_classes: int, dup: float, seed: int = 0, start: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    n_listings = n_rows // photos
    lid = np.repeat(np.arange(start, start + n_listings), photos)
    listing = pd.Series(lid).map("site:{:09d}".format)
    image = listing + "-" + pd.Series(np.tile(np.arange(photos), n_listings)).astype(str)
    cls = pd.Series(rng.integers(0, n_classes, n_listings)[lid - start]).map("make_model{:04d}".format)
    df = pd.DataFrame(
        {
            "listing_id": listing,
            "image_id": image,
            "dup_cluster": image.copy(),
            "class_label": cls,
            "status": np.full(len(lid), "kept", dtype=object),
            "reason": np.full(len(lid), None, dtype=object),
        }
    )
    m = int(len(df) * dup)
    a = rng.integers(0, len(df), m)
    b = rng.integers(0, len(df), m)
    df.loc[b, "dup_cluster"] = df.loc[a, "dup_cluster"].to_numpy()
    df.loc[b, ["status", "reason"]] = ["dropped", "duplicate"]
    return df


def rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB on Linux


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=2_000_000)
    p.add_argument("--photos", type=int, default=4)
    p.add_argument("--classes", type=int, default=200)
    p.add_argument("--dup", type=float, default=0.02)
    p.add_argument("--grow", type=float, default=0.1)
    p.add_argument("--tracemalloc", action="store_true")
    a = p.parse_args(argv)

    t0 = time.perf_counter()
    df = synthetic(a.rows, a.photos, a.classes, a.dup)
    print(f"synthetic manifest: {len(df):,} rows, {df['listing_id'].nunique():,} listings "
          f"in {time.perf_counter() - t0:.1f}s (rss {rss_gb():.2f} GB)")
    if a.tracemalloc:
        tracemalloc.start()

    t = time.perf_counter()
    out, assignments, info = assign_splits(df, run="bench-1")
    t_split = time.perf_counter() - t
    t = time.perf_counter()
    report = check_leakage(out)
    t_check = time.perf_counter() - t
    print(f"group + split: {t_split:.1f}s ({info['groups']:,} groups); leakage check: {t_check:.1f}s")
    worst = max(abs(report[f"{s}_frac"] - r).max() for s, r in (("train", 0.7), ("val", 0.15), ("test", 0.15)))
    print(f"  worst per-class ratio deviation: {worst * 100:.2f} points over {len(report)} classes")

    extra = synthetic(int(a.rows * a.grow), a.photos, a.classes, a.dup, seed=1, start=10**8)
    grown = pd.concat([df, extra], ignore_index=True)
    del out
    t = time.perf_counter()
    out2, _, info2 = assign_splits(grown, assignments, run="bench-2")
    t_grow = time.perf_counter() - t
    print(f"incremental (+{len(extra):,} rows): {t_grow:.1f}s, {info2['new_listings_assigned']:,} new listings assigned")

    total = t_split + t_check
    print(f"TOTAL group+split+check at {len(df):,} rows: {total:.1f}s")
    if a.tracemalloc:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        print(f"tracemalloc peak: {peak / 1024**3:.2f} GB")
    print(f"peak RSS: {rss_gb():.2f} GB")
    ok = total < 60 and rss_gb() < 4
    print("OK" if ok else "OVER BUDGET (60 s / 4 GB)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
