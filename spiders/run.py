"""Run a crawl from Python: ``scrapy crawl listings`` in a subprocess.

Twisted's reactor cannot be restarted inside a long-lived process (a Prefect worker),
and a crashed crawl must not take its caller down, so every crawl is a fresh process.
It runs in the caller's working directory, with the settings the caller resolved: they
are written (secrets left out: those stay in the environment) to a temporary YAML file
that the crawl reads as ``CARFLOW_CONFIG``, so the user's ``carflow.yaml`` (User-Agent,
politeness, profiles_dir) is the one the spider uses. The site profile is resolved here
too, to an absolute path. The crawl writes photos, listing feeds and
``crawls/<site>/<crawl_id>/stats.json`` to storage; :func:`run_crawl` returns that stats
dict, or raises :class:`CrawlFailed` when the crawl reached nothing.

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

from carflow.errors import UserError

REPO_ROOT = Path(__file__).resolve().parents[1]


class CrawlError(RuntimeError):
    """The crawl process failed; the message carries the end of its log."""


class CrawlFailed(CrawlError, UserError):
    """The crawl ran to its end but reached nothing (no search page answered, or no
    listing link on them); the message says which, in one line."""


def site_name(site: str | os.PathLike[str]) -> str:
    """The profile's site name (``demo`` or the ``name`` inside ``path/to/x.yaml``)."""
    from spiders.profile import load_profile

    return load_profile(site).name


def resolve_site(site: str | os.PathLike[str]) -> str:
    """The profile as the crawl process gets it: the absolute path of its YAML file (a
    name is looked up in ``crawl.profiles_dir`` and ``spiders/profiles/``, a relative
    path from the current directory). Loads it once: raises ``ProfileError``."""
    from carflow.settings import get_settings
    from spiders.profile import load_profile, profile_path

    path = profile_path(site, get_settings().crawl.profiles_dir).resolve()
    load_profile(path)
    return str(path)


def settings_file(directory: str | os.PathLike[str] | None = None) -> str:
    """The settings this process resolved, as a YAML file for the crawl process
    (``CARFLOW_CONFIG``). Secrets are left out: they are only read from the environment,
    which the crawl process inherits."""
    import yaml

    from carflow.settings import SECRET_FIELDS, get_settings

    data = get_settings().model_dump(mode="json")
    for section, name in SECRET_FIELDS:
        data.get(section, {}).pop(name, None)
    fd, path = tempfile.mkstemp(prefix="carflow-crawl-settings-", suffix=".yaml", dir=directory)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        yaml.safe_dump(data, fh, sort_keys=True)
    return path


def jobdir_crawl_id(jobdir: str | os.PathLike[str] | None) -> str | None:
    """The crawl id kept in ``<JOBDIR>``: the journal's (written when the crawl starts, so
    it survives a kill), else ``spider.state``'s (written at a graceful stop)."""
    if not jobdir:
        return None
    from spiders.journal import CrawlJournal

    kept = CrawlJournal(jobdir).read_marker().get("crawl_id")
    if kept:
        return kept
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
    """The ``scrapy crawl listings ...`` command line, run with this Python (and
    ``SCRAPY_SETTINGS_MODULE=spiders.settings``: see :func:`start_crawl`). The repo root
    replaces the working directory at the head of ``sys.path``: the crawl runs in the
    user's directory, whose own ``spiders/`` folder must not shadow carflow's."""
    boot = (f"import sys; sys.path[0] = {str(REPO_ROOT)!r}; sys.argv[0] = 'scrapy'; "
            "from scrapy.cmdline import execute; execute()")
    cmd = [python or sys.executable, "-c", boot, "crawl", "listings", "-a", f"site={os.fspath(site)}"]
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
    it gracefully (it flushes its feed and, with ``jobdir``, can be resumed); a crawl
    killed outright resumes from its ``jobdir`` journal.

    The process runs in this process's working directory, with this process's resolved
    settings (:func:`settings_file`) and the profile as an absolute path."""
    from spiders.spiders.listings import new_crawl_id

    site = resolve_site(site)
    jobdir = os.path.abspath(jobdir) if jobdir else None
    crawl_id = crawl_id or jobdir_crawl_id(jobdir) or new_crawl_id()
    cmd = crawl_command(site, storage, jobdir, crawl_id, overrides, max_listings, base_url=base_url)
    full_env = {**os.environ, "CARFLOW_CONFIG": settings_file(), **(env or {})}
    # the project's settings module, wherever the user runs from (no scrapy.cfg lookup)
    full_env["SCRAPY_SETTINGS_MODULE"] = "spiders.settings"
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), full_env.get("PYTHONPATH")]))
    if log_path is None:
        fd, log_path = tempfile.mkstemp(prefix=f"carflow-crawl-{crawl_id}-", suffix=".log")
        os.close(fd)
    log = open(log_path, "wb")  # noqa: SIM115 - handed to the child
    try:
        proc = subprocess.Popen(cmd, cwd=os.getcwd(), env=full_env, stdout=log, stderr=subprocess.STDOUT)
    finally:
        log.close()
    proc.log_path = str(log_path)  # type: ignore[attr-defined]
    proc.settings_path = full_env["CARFLOW_CONFIG"]  # type: ignore[attr-defined]
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
    Raises :class:`CrawlError` with the end of the crawl log when it fails, and
    :class:`CrawlFailed` (one line) when it ran but reached nothing."""
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
    finally:
        if proc.poll() is not None:
            Path(proc.settings_path).unlink(missing_ok=True)
    if rc != 0:
        raise CrawlError(f"crawl of {name!r} exited {rc} (log {proc.log_path}):\n{_tail(proc.log_path)}")
    try:
        stats = read_stats(site, crawl_id, storage)
    except StorageKeyError:
        raise CrawlError(f"crawl of {name!r} wrote no stats (log {proc.log_path}):\n{_tail(proc.log_path)}") from None
    stats["log_path"] = proc.log_path
    if stats.get("carflow/failed"):
        raise CrawlFailed(f"{stats['carflow/failed']} (crawl {crawl_id}, log {proc.log_path})")
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
