"""What every carflow entry point does before a flow runs, in one place.

``carflow <command>`` and ``python -m flows.<name>`` both call a flow module's ``main``,
and every ``main`` is wrapped by :func:`entry_point`, which

- sets the process defaults carflow needs before Prefect starts anything
  (:data:`PREFECT_DEFAULTS`, :data:`QUIET_DEFAULTS`); a value the user set wins:
  - a generous startup timeout for Prefect's temporary server (its 20 s default is too
    short on a busy 2-core machine),
  - no telemetry heartbeat from the temporary server (carflow runs offline),
  - TensorFlow/absl/oneDNN/Keras start-up noise silenced at its source;
- loads the settings first, so a bad setting is one line before any flow run starts;
- turns a :class:`carflow.errors.UserError` (a missing path or input manifest, a bad
  setting or site profile) into one line on stderr and exit code 2, without a
  traceback: the console log handler drops the traceback of such errors, the Prefect API
  log (the UI) keeps it.

Nothing happens at import time: :func:`prepare_process` runs when a ``main`` is called.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from carflow.errors import UserError
from carflow.memory import glibc

#: Prefect settings (env names) that carflow's entry points default
PREFECT_DEFAULTS: dict[str, str] = {
    # Prefect's temporary server: 20 s is too short when another job shares the cores
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    # the temporary server's telemetry heartbeat (sens-o-matic.prefect.io): offline machines
    # log "Failed to send telemetry" for every run
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
}

#: memory: Arrow's system allocator (glibc) instead of its bundled mimalloc, which kept
#: ~50 MB more of freed buffers at the peak of a 100k-photo ingest (bench/memory.py);
#: read by pyarrow once, when it is first imported, so it is set with the Prefect defaults
MEMORY_DEFAULTS: dict[str, str] = {"ARROW_DEFAULT_MEMORY_POOL": "system"}

#: glibc malloc arenas (``MALLOC_ARENA_MAX``): by default glibc gives up to 8 per core, and
#: each Prefect task thread's freed memory stays in its own arena: 34 MB more RSS at the
#: peak of a 100k-photo ingest (bench/memory.py). One per core: threads running Python hold
#: the GIL anyway.
MALLOC_ARENAS = str(max(2, os.cpu_count() or 2))

#: glibc's mmap threshold (``MALLOC_MMAP_THRESHOLD_``), fixed: a buffer of 1 MiB or more
#: (a column, a NumPy work array) is mapped on its own and goes back to the OS when freed.
#: glibc's default threshold grows up to 32 MiB once such a buffer is freed, after which
#: they come from the heap and their pages stay: the clean stage's peak at 100k images
#: varied from 287 to 312 MB with it, and was 266-271 MB with this (same wall time at 10k:
#: bench/orchestration.py)
MALLOC_MMAP_THRESHOLD = str(1 << 20)

#: ``mallopt`` parameters (malloc.h) and the environment variable that sets each at start-up
_MALLOPT = {"MALLOC_ARENA_MAX": (-8, MALLOC_ARENAS), "MALLOC_MMAP_THRESHOLD_": (-3, MALLOC_MMAP_THRESHOLD)}


def tune_malloc() -> list[str]:
    """Apply :data:`MALLOC_ARENAS` and :data:`MALLOC_MMAP_THRESHOLD` in this process
    (``mallopt``, before the task threads start) and in its subprocesses (their environment
    variables), each unless the user set its variable (glibc applied that at start-up).
    Returns the variables applied; none where there is no glibc (macOS, musl)."""
    libc, applied = glibc(), []
    for name, (param, value) in _MALLOPT.items():
        if name in os.environ:
            continue
        os.environ[name] = value
        if libc is not None and libc.mallopt(param, int(value)):
            applied.append(name)
    return applied


class ThreadTimeoutNotice(logging.Filter):
    """Drops Prefect's warning, logged for every task with a timeout that runs in a worker
    thread (every shard task of a stage: ``RETRY.io()`` sets ``runtime.task_timeout_s``),
    that such a timeout cannot interrupt a blocking call. It said the same thing once per
    shard (50 lines for 100k images) about a setting that works as documented: a thread
    task's timeout takes effect when its running call returns (README, retries)."""

    PREFIX = "Timeout of %s seconds configured for this task, but the task is running in a worker thread"

    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, str) and record.msg.startswith(self.PREFIX))


def quiet_thread_timeout_notice() -> None:
    """Install :class:`ThreadTimeoutNotice` on Prefect's task-run logger (once)."""
    logger = logging.getLogger("prefect.task_runs")
    if not any(isinstance(f, ThreadTimeoutNotice) for f in logger.filters):
        logger.addFilter(ThreadTimeoutNotice())


#: framework start-up noise, silenced where it is made
QUIET_DEFAULTS: dict[str, str] = {
    # TensorFlow's own C++ log once it is initialised (its start-up banners, logged through
    # absl before that, are filtered where TensorFlow is imported: carflow.frameworks)
    "TF_CPP_MIN_LOG_LEVEL": "2",
    # ultralytics: no update checks or settings downloads
    "YOLO_OFFLINE": "1",
}


def prepare_process() -> None:
    """Set carflow's defaults in ``os.environ`` (for this process and every subprocess it
    starts: Prefect's temporary server, the crawl) and filter known framework warnings."""
    for name, value in {**PREFECT_DEFAULTS, **MEMORY_DEFAULTS, **QUIET_DEFAULTS}.items():
        os.environ.setdefault(name, value)
    # Keras warns about things the pipeline does on purpose (e.g. an input shape given
    # to a Sequential layer, a non-square MobileNetV2 input without ImageNet weights)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"keras(\.|$)")
    warnings.filterwarnings("ignore", category=UserWarning, module=r"tensorflow(\.|$)")


@contextmanager
def prefect_defaults() -> Iterator[None]:
    """:data:`PREFECT_DEFAULTS` as defaults of Prefect's settings in this process too:
    Prefect read the environment when it was imported, which may have been before
    :func:`prepare_process` ran. A value the user set (env or profile) still wins."""
    try:
        from prefect.settings import temporary_settings
    except ImportError:  # pragma: no cover - Prefect is a dependency
        yield
        return
    defaults = {_setting_name(k): _typed(v) for k, v in PREFECT_DEFAULTS.items()}
    with temporary_settings(set_defaults=defaults):
        yield


def _setting_name(env: str) -> Any:
    import prefect.settings as ps

    return getattr(ps, env)


def _typed(value: str) -> Any:
    if value in ("true", "false"):
        return value == "true"
    return int(value) if value.isdigit() else value


class _NoUserErrorTraceback(logging.Filter):
    """Drops the traceback of a :class:`UserError` from console log records (Prefect logs
    a failed task or flow with its traceback); the message stays."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, UserError):
            record.exc_info = None
            record.exc_text = None
        return True


@contextmanager
def quiet_user_errors() -> Iterator[None]:
    handlers = [h for h in logging.getLogger().handlers if isinstance(h, logging.StreamHandler)]
    filt = _NoUserErrorTraceback()
    for h in handlers:
        h.addFilter(filt)
    try:
        yield
    finally:
        for h in handlers:
            h.removeFilter(filt)


def user_error_line(exc: BaseException) -> str:
    return f"carflow: {exc}"


def entry_point(main: Callable[[list[str] | None], Any]) -> Callable[[list[str] | None], int]:
    """Wrap a flow module's ``main(argv)``: defaults, settings first, and a
    :class:`UserError` as one line on stderr with exit code 2. Returns an exit code."""

    @functools.wraps(main)
    def wrapper(argv: list[str] | None = None) -> int:
        prepare_process()
        try:
            _ensure_prefect_logging()
            with prefect_defaults(), quiet_user_errors():
                from carflow.settings import get_settings

                get_settings()  # a bad setting fails here, before any flow run
                result = main(argv)
        except UserError as exc:
            print(user_error_line(exc), file=sys.stderr)
            return exc.exit_code
        return result if isinstance(result, int) else 0

    return wrapper


def _ensure_prefect_logging() -> None:
    """Prefect installs its console handler when it is imported; import it now so the
    traceback filter has a handler to sit on."""
    try:
        import prefect  # noqa: F401
    except ImportError:  # pragma: no cover
        pass
