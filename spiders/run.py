"""Run a crawl from Python: ``python -m scrapy crawl listings`` in a subprocess.

Twisted's reactor cannot be restarted inside a long-lived process (a Prefect worker),
and a crashed crawl must not take its caller down, so every crawl is a fresh process
started from the repository root (where ``scrapy.cfg`` is). The crawl writes photos,
listing feeds and ``crawls/<site>/<crawl_id>/stats.json`` to storage;
:func:`run_crawl` returns that stats dict.

    from spiders.run import run_crawl
    stats = run_crawl("demo", storage="s3://bucket/carflow", overrides={"DOWNLOAD_DELAY": 0},
                      base_url="http://127.0.0.1:8765")

    python -m spiders.run demo --base-url http://127.0.0.1:8765 [--storage URI] [--jobdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]


class CrawlError(RuntimeError):
    """The crawl process failed; the message carries the end of its log."""


def site_name(site: str | os.PathLike[str]) -> str:
    """The profile's site name (``demo`` or the ``name`` inside ``path/to/x.yaml``)."""
    from spiders.profile import load_profile

    return load_profile(site).name


def jobdir_crawl_id(jobdir: str | os.PathLike[str] | None) -> str | None:
    """The crawl id an interrupted crawl kept in ``<JOBDIR>/spider.state``, if any."""
    if not jobdir:
        return None
    state = Path(jobdir) / "spider.state"
    if not state.exists():
        return None
    try:
        with state.open("rb") as fh:
            data = pickle.load(fh)  # noqa: S301 - our own JOBDIR
    except Exception:
        return None
    return data.get("crawl_id") if isinstance(data, dict) else None


def _setting_value(value: Any) -> str:
    if isinstance(value, bool):
        return "True" if value else "False"
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)


def crawl_command(
    site: str | os.PathLike[str],
    storage: str | None = None,
    jobdir: str | os.PathLike[str] | None = None,
    crawl_id: str | None = None,
    overrides: dict[str, Any] | None = None,
    max_listings: int | None = None,
    *,
    base_url: str | None = None,
    python: str | None = None,
) -> list[str]:
    """The ``python -m scrapy crawl listings ...`` command line (run it from the repo root)."""
    cmd = [python or sys.executable, "-m", "scrapy", "crawl", "listings", "-a", f"site={os.fspath(site)}"]
    if storage:
        cmd += ["-a", f"storage={storage}"]
    if base_url:
        cmd += ["-a", f"base_url={base_url}"]
    if crawl_id:
        cmd += ["-a", f"crawl_id={crawl_id}"]
    if max_listings:
        cmd += ["-a", f"max_listings={int(max_listings)}"]
    if jobdir:
        cmd += ["-s", f"JOBDIR={os.fspath(jobdir)}"]
    for key, value in (overrides or {}).items():
        cmd += ["-s", f"{key}={_setting_value(value)}"]
    return cmd


def start_crawl(
    site: str | os.PathLike[str],
    storage: str | None = None,
    jobdir: str | os.PathLike[str] | None = None,
    crawl_id: str | None = None,
    overrides: dict[str, Any] | None = None,
    max_listings: int | None = None,
    *,
    base_url: str | None = None,
    log_path: str | os.PathLike[str] | None = None,
    env: dict[str, str] | None = None,
) -> tuple[subprocess.Popen, str]:
    """Start a crawl process; returns it and its crawl id. Send it SIGINT/SIGTERM to stop
    it gracefully (it flushes its feed and, with ``jobdir``, can be resumed)."""
    from spiders.spiders.listings import new_crawl_id

    crawl_id = crawl_id or jobdir_crawl_id(jobdir) or new_crawl_id()
    cmd = crawl_command(site, storage, jobdir, crawl_id, overrides, max_listings, base_url=base_url)
    full_env = {**os.environ, **(env or {})}
    full_env.pop("SCRAPY_SETTINGS_MODULE", None)  # scrapy.cfg at the repo root decides
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), full_env.get("PYTHONPATH")]))
    if log_path is None:
        fd, log_path = tempfile.mkstemp(prefix=f"carflow-crawl-{crawl_id}-", suffix=".log")
        os.close(fd)
    log = open(log_path, "wb")  # noqa: SIM115 - handed to the child
    try:
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=full_env, stdout=log, stderr=subprocess.STDOUT)
    finally:
        log.close()
    proc.log_path = str(log_path)  # type: ignore[attr-defined]
    return proc, crawl_id


def read_stats(site: str | os.PathLike[str], crawl_id: str, storage: str | None = None) -> dict[str, Any]:
    """``crawls/<site>/<crawl_id>/stats.json`` from storage."""
    from carflow.keys import crawl_stats_key as stats_key
    from carflow.storage import open_storage

    store = open_storage(storage)
    stats = json.loads(store.get_text(stats_key(site_name(site), crawl_id)))
    stats["crawl_id"] = crawl_id
    return stats


def _tail(path: str, limit: int = 2000) -> str:
    try:
        data = Path(path).read_bytes()
    except OSError:
        return ""
    return data[-limit:].decode("utf-8", "replace")


def run_crawl(
    site: str | os.PathLike[str],
    storage: str | None = None,
    jobdir: str | os.PathLike[str] | None = None,
    crawl_id: str | None = None,
    overrides: dict[str, Any] | None = None,
    max_listings: int | None = None,
    *,
    base_url: str | None = None,
    timeout: float | None = None,
    log_path: str | os.PathLike[str] | None = None,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Run one crawl to the end in a subprocess and return its stats (read back from
    storage, plus ``crawl_id``). ``overrides`` are Scrapy settings (``-s``).
    Raises :class:`CrawlError` with the end of the crawl log when it fails."""
    from carflow.storage import StorageKeyError

    name = site_name(site)  # validates the profile here, with a clear error
    proc, crawl_id = start_crawl(
        site, storage, jobdir, crawl_id, overrides, max_listings, base_url=base_url, log_path=log_path, env=env
    )
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        raise CrawlError(f"crawl of {name!r} ran past {timeout}s:\n{_tail(proc.log_path)}") from None
    if rc != 0:
        raise CrawlError(f"crawl of {name!r} exited {rc} (log {proc.log_path}):\n{_tail(proc.log_path)}")
    try:
        stats = read_stats(site, crawl_id, storage)
    except StorageKeyError:
        raise CrawlError(f"crawl of {name!r} wrote no stats (log {proc.log_path}):\n{_tail(proc.log_path)}") from None
    stats["log_path"] = proc.log_path
    return stats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m spiders.run", description="Run one crawl (a subprocess).")
    parser.add_argument("site", help="profile name (spiders/profiles/<name>.yaml) or a YAML path")
    parser.add_argument("--storage", help="storage URI (default: carflow settings)")
    parser.add_argument("--base-url")
    parser.add_argument("--jobdir", help="Scrapy JOBDIR: a stopped crawl resumes from here")
    parser.add_argument("--crawl-id")
    parser.add_argument("--max-listings", type=int)
    parser.add_argument("-s", "--set", action="append", default=[], metavar="NAME=VALUE", help="Scrapy setting")
    a = parser.parse_args(argv)
    overrides = dict(s.split("=", 1) for s in a.set)
    stats = run_crawl(a.site, a.storage, a.jobdir, a.crawl_id, overrides, a.max_listings, base_url=a.base_url)
    print(json.dumps({k: v for k, v in stats.items() if k.startswith("carflow/") or k == "finish_reason"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
