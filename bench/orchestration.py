"""Orchestration cost of the clean stage: Prefect overhead, memory growth, scale-out.

Images are generated cheaply (``demo.bulk``: a few small JPEG bodies, each image with
its own comment segment, so every sha256 differs; every 10th image a planted problem)
into a temporary local storage, with their manifest v0. Then, in one run:

(a) overhead: the clean stage on ``--n`` images as plain function calls (the same plan,
    shard function and reduce, the same shard size and shards in flight, in a plain
    thread pool) and through the Prefect flow with its shard tasks (thread runner, a
    warm API). Each side runs twice, in A B B A order, after a small warm-up run of each;
    prints the best time of each side and the ratio. Target ≤ 1.05.
(b) memory: the flow on ``--mem-small`` and on ``--mem-large`` images, each in a fresh
    child process; peak RSS (the child's own ``VmHWM``: :func:`own_peak_kb`) of each, the
    ratio, and the ratio apart from the clean manifest's Arrow size.
    Target ≤ 1.2×: a manifest-and-hash workload never holds the images.
(c) scale-out: the flow through prefect-dask's ``DaskTaskRunner`` on a 2-worker
    ``distributed.LocalCluster`` (one thread each, processes), next to Prefect's local
    process runner with 2 processes, on ``--scale-n`` images.

    python bench/orchestration.py [--n 20000] [--mem-small 10000] [--mem-large 100000]
                                  [--scale-n 20000] [--shard-size 2000] [--parts overhead,memory,scale]

Every run writes into a fresh storage (a shard cache hit would measure nothing). All runs
use one local Prefect server (Prefect's test harness: a temporary database), as a
deployment would; the process and Dask runners need a server their workers can reach.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _quiet_prefect(home: str) -> None:
    os.environ.setdefault("PREFECT_HOME", home)
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")


def generate(root: Path, n: int) -> str:
    from carflow.storage import open_storage
    from demo.bulk import write_bulk_ingest

    write_bulk_ingest(open_storage(str(root)), n, bodies=32, broken_every=10)
    return str(root)


def plain_clean(uri: str, shard_size: int) -> dict:
    """The clean stage as plain function calls: the flow's work without Prefect. The same
    plan, the same shard function (``inspect_shard_task.fn``: shard contract, storage
    writes) on the same number of shards in flight (``runtime.max_workers``, a plain
    thread pool), then the same reduce (``clean_reduce_task.fn``)."""
    from concurrent.futures import ThreadPoolExecutor

    from carflow.keys import manifest_key
    from carflow.manifest import INGEST_SCHEMA
    from carflow.settings import get_settings
    from carflow.storage import open_storage
    from tasks.clean import clean_reduce_task, inspect_shard_task, shard_config
    from tasks.shards import plan_input

    cfg = get_settings()
    prefix = cfg.runtime.manifests_prefix
    source = plan_input(open_storage(uri), manifest_key("ingest", prefix=prefix), INGEST_SCHEMA, shard_size)
    config = shard_config(cfg.fix, cfg.quality)
    with ThreadPoolExecutor(cfg.runtime.max_workers) as pool:
        results = list(pool.map(lambda ids: inspect_shard_task.fn(uri, ids, config), source.shards))
    reduced = clean_reduce_task.fn(
        uri, source.key, source.hash, [r["key"] for r in results],
        {"quality": cfg.quality.model_dump(mode="json"), "dedup": cfg.dedup.model_dump(mode="json")}, prefix,
    )
    return {"rows": reduced["rows"], "kept": reduced["kept"]}


def flow_clean(uri: str, shard_size: int, runtime=None) -> dict:
    from flows.clean import clean
    from tasks.runners import task_runner

    f = clean if runtime is None else clean.with_options(task_runner=task_runner("cpu", runtime))
    return f(storage=uri, shard_size=shard_size)


def warm_prefect() -> None:
    """Reach the API once before anything is timed."""
    from prefect import flow

    @flow
    def noop() -> int:
        return 1

    noop()


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - t, out


def overhead(tmp: Path, n: int, shard_size: int, rounds: int = 2) -> dict:
    """Plain calls and the flow, each ``rounds`` times in A B B A order (a busy machine's
    drift hits both sides alike), after one small run of each (imports, the API, the
    page cache warm for both); the best time of each side is compared."""
    warm_prefect()
    for side in ("plain", "flow"):
        (plain_clean if side == "plain" else flow_clean)(generate(tmp / f"warm-{side}", 200), shard_size)
    times: dict[str, list[float]] = {"plain": [], "flow": []}
    order = [s for r in range(rounds) for s in (("plain", "flow") if r % 2 == 0 else ("flow", "plain"))]
    outs = {}
    for i, side in enumerate(order):
        uri = generate(tmp / f"{side}-{i}", n)
        t, outs[side] = timed(plain_clean if side == "plain" else flow_clean, uri, shard_size)
        times[side].append(t)
        shutil.rmtree(uri, ignore_errors=True)
    plain, summary = outs["plain"], outs["flow"]
    assert plain["rows"] == summary["rows"] and plain["kept"] == summary["kept"], (plain, summary)
    t_plain, t_flow = min(times["plain"]), min(times["flow"])
    return {"n": n, "shards": summary["shards"], "plain_s": round(t_plain, 2), "flow_s": round(t_flow, 2),
            "ratio": round(t_flow / t_plain, 3), "plain_runs_s": [round(t, 2) for t in times["plain"]],
            "flow_runs_s": [round(t, 2) for t in times["flow"]]}


def child_peak_rss(uri: str, shard_size: int) -> dict:
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PYTHONPATH": str(ROOT), "PREFECT_API_URL": str(PREFECT_API_URL.value())}
    out = subprocess.run(
        [sys.executable, __file__, "--_child", uri, "--shard-size", str(shard_size)],
        check=True, capture_output=True, text=True, env=env,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def own_peak_kb() -> int:
    """This process's own peak RSS (``VmHWM``: the high-water mark of its address space
    since its ``exec``). Not ``ru_maxrss``: Linux carries the parent's high-water mark
    into a child at ``exec``, so a child started by this bench after it generated 100k
    rows reported the parent's ~550 MB, not its own ~370 MB."""
    try:
        with open("/proc/self/status") as fh:
            return int(fh.read().split("VmHWM:")[1].split()[0])
    except (OSError, IndexError, ValueError):  # no procfs (macOS): ru_maxrss, in bytes there
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak // 1024 if sys.platform == "darwin" else peak


def manifest_mb(uri: str) -> float:
    """The clean manifest's in-memory Arrow size (what the reduce holds by design)."""
    import pyarrow.parquet as pq

    return round(pq.read_table(uri.removeprefix("file://")).nbytes / 2**20, 1)


def memory(tmp: Path, small: int, large: int, shard_size: int) -> dict:
    res = {}
    for label, n in (("small", small), ("large", large)):
        uri = generate(tmp / f"mem-{n}", n)
        res[label] = {"n": n, **child_peak_rss(uri, shard_size)}
        shutil.rmtree(uri, ignore_errors=True)
    lo, hi = res["small"], res["large"]
    res["ratio"] = round(hi["peak_rss_mb"] / lo["peak_rss_mb"], 3)
    res["ratio_apart_from_manifest"] = round(
        (hi["peak_rss_mb"] - hi["manifest_mb"]) / (lo["peak_rss_mb"] - lo["manifest_mb"]), 3)
    return res


def scale(tmp: Path, n: int, shard_size: int) -> dict:
    from distributed import LocalCluster

    from carflow.settings import RuntimeSettings

    a, b = generate(tmp / "process", n), generate(tmp / "dask", n)
    warm_prefect()
    t_proc, _ = timed(flow_clean, a, shard_size, RuntimeSettings(task_runner="process", max_workers=2))
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        dask_rt = RuntimeSettings(task_runner="dask", dask_address=cluster.scheduler_address)
        t_dask, _ = timed(flow_clean, b, shard_size, dask_rt)
    return {"n": n, "process_2_s": round(t_proc, 2), "dask_2_workers_s": round(t_dask, 2),
            "dask_over_process": round(t_dask / t_proc, 3)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=20_000, help="images for the overhead comparison")
    p.add_argument("--mem-small", type=int, default=10_000)
    p.add_argument("--mem-large", type=int, default=100_000)
    p.add_argument("--scale-n", type=int, default=20_000)
    p.add_argument("--shard-size", type=int, default=2000)
    p.add_argument("--parts", default="overhead,memory,scale")
    p.add_argument("--json", help="also write the figures here")
    p.add_argument("--_child", help=argparse.SUPPRESS)
    a = p.parse_args()

    home = tempfile.mkdtemp(prefix="carflow-bench-prefect-")
    _quiet_prefect(home)
    try:
        if a._child:  # memory: one flow run in this process (the parent's server), then its peak RSS
            warm_prefect()
            summary = flow_clean(a._child, a.shard_size)
            print(json.dumps({"rows": summary["rows"], "peak_rss_mb": round(own_peak_kb() / 1024, 1),
                              "manifest_mb": manifest_mb(summary["manifest"])}))
            return 0
        # one Prefect server (temporary database) for every run: the process and Dask
        # runners' workers must reach an API; an ephemeral one per process is not shared
        from prefect.testing.utilities import prefect_test_harness

        with prefect_test_harness(server_startup_timeout=120):
            return run_parts(a)
    finally:
        shutil.rmtree(home, ignore_errors=True)


def run_parts(a: argparse.Namespace) -> int:
    parts = set(a.parts.split(","))
    results: dict = {"cpus": os.cpu_count(), "shard_size": a.shard_size}
    tmp = Path(tempfile.mkdtemp(prefix="carflow-bench-orch-"))
    try:
        if "overhead" in parts:
            r = results["overhead"] = overhead(tmp, a.n, a.shard_size)
            print(f"(a) overhead, {r['n']} images in {r['shards']} shards: plain calls {r['plain_s']} s, "
                  f"Prefect flow {r['flow_s']} s, ratio {r['ratio']} (target <= 1.05; runs: plain "
                  f"{r['plain_runs_s']}, flow {r['flow_runs_s']})", flush=True)
        if "memory" in parts:
            r = results["memory"] = memory(tmp, a.mem_small, a.mem_large, a.shard_size)
            print(f"(b) memory: peak RSS {r['small']['peak_rss_mb']} MB at {r['small']['n']} images, "
                  f"{r['large']['peak_rss_mb']} MB at {r['large']['n']}, ratio {r['ratio']} (target <= 1.2); "
                  f"apart from the clean manifest ({r['small']['manifest_mb']} / {r['large']['manifest_mb']} MB "
                  f"in Arrow) {r['ratio_apart_from_manifest']}", flush=True)
        if "scale" in parts:
            r = results["scale"] = scale(tmp, a.scale_n, a.shard_size)
            print(f"(c) scale-out, {r['n']} images: process runner (2 processes) {r['process_2_s']} s, "
                  f"DaskTaskRunner on a 2-worker LocalCluster {r['dask_2_workers_s']} s, "
                  f"ratio {r['dask_over_process']}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
