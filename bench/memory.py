"""Peak memory of ingest (folder import) and clean as the corpus grows, side by side.

    python bench/memory.py [--sizes 10000 100000] [--photos 5] [--bases 1000] [--dir DIR] [--keep]

For each size N, generates a seed-style folder dataset of N small 320×240 JPEGs
(``<make>_<model>_<year>/<listing>_<photo>_<uuid>.jpg``, ``--photos`` per listing). To
keep generation cheap, ``--bases`` distinct pictures are encoded once and every file is
one of them with a counter in a JPEG comment segment, so every file has its own sha256
(and is a distinct image to ingest and clean) while the decoded pixels repeat.

Then runs, each in a fresh subprocess with a fresh ``PREFECT_HOME`` (nothing cached):

1. ``python -m flows.ingest --folders SRC --storage STORE``  (import + manifest v0)
2. ``python -m flows.clean --storage STORE``                  (fix, quality, dedup)

and prints wall time and the child's peak RSS (``ru_maxrss`` from ``os.wait4``: the
flow process itself; Prefect's temporary API server is a separate process), the
manifest's in-memory Arrow size, and the ratio between the largest and the smallest
size: the raw RSS ratio, and the ratio with the manifest's own Arrow size taken out
(``(rss - manifest)``). Target (issue 9): ≤ 1.2× from 10k to 100k, apart from the
manifest itself.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MAKES = [("toyota", "corolla"), ("ford", "ranger"), ("vw", "golf"), ("fiat", "uno"), ("honda", "civic"),
         ("chevrolet", "onix"), ("renault", "clio"), ("bmw", "x1"), ("audi", "a3"), ("kia", "rio")]


def base_jpegs(n: int, seed: int = 0) -> list[bytes]:
    """``n`` distinct 320×240 pictures (coloured blocks over a gradient, a little noise)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:240, 0:320]
    out = []
    for _ in range(n):
        img = np.empty((240, 320, 3), np.float32)
        c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        t = (yy / 240.0)[..., None]
        img[:] = c0 * (1 - t) + c1 * t
        for _ in range(rng.integers(3, 8)):
            x0, y0 = rng.integers(0, 280), rng.integers(0, 200)
            w, h = rng.integers(20, 160), rng.integers(20, 120)
            img[y0 : y0 + h, x0 : x0 + w] = rng.uniform(0, 255, 3)
        img += rng.normal(0, 4, img.shape)
        buf = io.BytesIO()
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=85)
        out.append(buf.getvalue())
    return out


def with_comment(jpeg: bytes, text: bytes) -> bytes:
    """``jpeg`` with a COM segment holding ``text`` right after SOI (same pixels, new bytes)."""
    return jpeg[:2] + b"\xff\xfe" + (len(text) + 2).to_bytes(2, "big") + text + jpeg[2:]


def generate(out: Path, n: int, photos: int, bases: list[bytes], seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    n_listings = -(-n // photos)
    classes = [f"{m}_{mo}_{2010 + y}" for m, mo in MAKES for y in range(5)]
    for c in classes:
        (out / c).mkdir(parents=True, exist_ok=True)
    cls_of = rng.integers(0, len(classes), n_listings)
    base_of = rng.integers(0, len(bases), n)
    for i in range(n):
        listing, photo = divmod(i, photos)
        name = f"L{listing:07d}_{photo}_{uuid.UUID(int=rng.integers(0, 2**63)).hex[:12]}.jpg"
        (out / classes[cls_of[listing]] / name).write_bytes(with_comment(bases[base_of[i]], b"carflow %d" % i))


def _own_hwm_mb() -> float:
    try:
        with open("/proc/self/status") as fh:
            return int(fh.read().split("VmHWM:")[1].split()[0]) / 1024
    except (OSError, IndexError, ValueError):
        return 0.0


def run_measured(cmd: list[str], env: dict[str, str]) -> dict:
    """Run ``cmd``; wall seconds and the child's peak RSS (MB). Linux carries the parent's
    high-water mark into a child at ``exec``, so the child's ``ru_maxrss`` is the larger of
    its own peak and this process's: this bench stays far below its children (it is
    checked, and a figure that could be the parent's fails the run)."""
    parent = _own_hwm_mb()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stderr.write(out.decode(errors="replace")[-4000:])
        raise SystemExit(f"{' '.join(cmd)} failed with exit code {proc.returncode}")
    rss = usage.ru_maxrss / 1024
    if rss <= parent + 1:
        raise SystemExit(f"{' '.join(cmd)}: peak RSS {rss:.0f} MB is not above this bench's own {parent:.0f} MB: "
                         "it may be the parent's (ru_maxrss is inherited at exec)")
    return {"wall_s": round(wall, 1), "rss_mb": round(rss, 1)}


def manifest_mb(store: Path, stage: str) -> float:
    import pyarrow.parquet as pq

    from carflow.keys import manifest_key

    return round(pq.read_table(store / manifest_key(stage)).nbytes / 2**20, 1)


def measure(size: int, work: Path, args, bases: list[bytes]) -> dict:
    src, store = work / f"src-{size}", work / f"store-{size}"
    t0 = time.perf_counter()
    generate(src, size, args.photos, bases, seed=size)
    print(f"  {size}: generated in {time.perf_counter() - t0:.0f}s", flush=True)
    result: dict = {"images": size}
    for stage, cmd in (
        ("ingest", [sys.executable, "-m", "flows.ingest", "--folders", str(src), "--storage", str(store)]),
        ("clean", [sys.executable, "-m", "flows.clean", "--storage", str(store)]),
    ):
        home = tempfile.mkdtemp(prefix="carflow-bench-prefect-", dir=work)
        env = {**os.environ, "PREFECT_HOME": home, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
               "PREFECT_LOGGING_LEVEL": "WARNING", "PYTHONPATH": str(ROOT),
               # a busy machine can take longer than the default 20 s to start the temporary server
               "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180"}
        env = {k: v for k, v in env.items() if not k.startswith("CARFLOW_")}
        result[stage] = {**run_measured(cmd, env), "manifest_mb": manifest_mb(store, stage)}
        print(f"  {size}: {stage} {result[stage]}", flush=True)
    if not args.keep:
        shutil.rmtree(src, ignore_errors=True)
        shutil.rmtree(store, ignore_errors=True)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    p.add_argument("--photos", type=int, default=5, help="photos per listing")
    p.add_argument("--bases", type=int, default=1000, help="distinct pictures")
    p.add_argument("--dir", help="work folder (default: a temp folder, removed afterwards)")
    p.add_argument("--keep", action="store_true", help="keep the generated folders and stores")
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args(argv)
    work = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="carflow-bench-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"bench/memory.py: sizes {args.sizes}, {args.photos} photos per listing, work in {work}", flush=True)
    try:
        bases = base_jpegs(args.bases)
        results = [measure(n, work, args, bases) for n in sorted(args.sizes)]
    finally:
        if not args.dir and not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    print()
    print(f"{'images':>9} | {'ingest wall':>11} {'peak RSS':>9} {'manifest':>9} | "
          f"{'clean wall':>10} {'peak RSS':>9} {'manifest':>9}")
    for r in results:
        i, c = r["ingest"], r["clean"]
        print(f"{r['images']:>9,} | {i['wall_s']:>10.1f}s {i['rss_mb']:>7.0f}MB {i['manifest_mb']:>7.1f}MB | "
              f"{c['wall_s']:>9.1f}s {c['rss_mb']:>7.0f}MB {c['manifest_mb']:>7.1f}MB")
    if len(results) > 1:
        lo, hi = results[0], results[-1]
        print(f"\n{hi['images']:,} / {lo['images']:,} images ({hi['images'] / lo['images']:.0f}×):")
        for stage in ("ingest", "clean"):
            a, b = lo[stage], hi[stage]
            raw = b["rss_mb"] / a["rss_mb"]
            net = (b["rss_mb"] - b["manifest_mb"]) / (a["rss_mb"] - a["manifest_mb"])
            print(f"  {stage:6}: peak RSS {raw:.2f}×, apart from the manifest {net:.2f}× (target ≤ 1.20×); "
                  f"wall {b['wall_s'] / a['wall_s']:.1f}×")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
