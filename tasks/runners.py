"""Where a flow's tasks run: the task runner is a setting (``runtime.task_runner``).

=============  =====================================================================
``thread``     Prefect's ``ThreadPoolTaskRunner`` for every stage (the default)
``process``    Prefect's ``ProcessPoolTaskRunner`` for every stage
``local``      threads for I/O stages, processes for CPU stages
``dask``       an existing Dask cluster at ``runtime.dask_address``, through
               prefect-dask's ``DaskTaskRunner(address=...)`` (its workers need this
               code and its dependencies: the worker image)
=============  =====================================================================

``runtime.max_workers`` sizes the local pools. A flow takes ``task_runner("cpu")`` or
``task_runner("io")`` at decoration; nothing is read then: the runner is chosen from the
settings when a run starts (Prefect copies a flow's runner with ``duplicate()`` at the
start of every run, and that is where :class:`SettingsTaskRunner` builds the real one).
"""

from __future__ import annotations

from typing import Any, Literal

from prefect.task_runners import ProcessPoolTaskRunner, TaskRunner, ThreadPoolTaskRunner

from carflow.errors import UserError
from carflow.settings import RuntimeSettings, Settings, get_settings

StageKind = Literal["cpu", "io"]


def build_task_runner(stage_kind: StageKind, runtime: RuntimeSettings) -> TaskRunner:
    """The concrete runner for a stage of kind ``stage_kind`` under ``runtime``."""
    if stage_kind not in ("cpu", "io"):
        raise ValueError(f"stage_kind must be 'cpu' or 'io', got {stage_kind!r}")
    kind = runtime.task_runner
    if kind != "thread" and not (stage_kind == "io" and kind == "local"):
        _require_api(kind)
    if kind == "dask":
        from prefect_dask import DaskTaskRunner

        return DaskTaskRunner(address=runtime.dask_address)
    if kind == "process" or (kind == "local" and stage_kind == "cpu"):
        return ProcessPoolTaskRunner(max_workers=runtime.max_workers)
    return ThreadPoolTaskRunner(max_workers=runtime.max_workers)


def _require_api(kind: str) -> None:
    """Worker processes report to the Prefect API: an ephemeral one (no
    ``PREFECT_API_URL``) lives in this process only, and each worker would start its own."""
    from prefect.settings import get_current_settings

    if not get_current_settings().api.url:
        raise UserError(
            f"runtime.task_runner={kind!r} needs a Prefect server its workers can reach: set PREFECT_API_URL "
            "(e.g. `prefect server start`, then `export PREFECT_API_URL=http://127.0.0.1:4200/api`)"
        )


class SettingsTaskRunner(TaskRunner):
    """A flow's runner placeholder: each run gets the runner the settings name then."""

    def __init__(self, stage_kind: StageKind):
        super().__init__()
        self.stage_kind = stage_kind

    def duplicate(self) -> TaskRunner:
        return build_task_runner(self.stage_kind, get_settings().runtime)

    def submit(self, *args: Any, **kwargs: Any) -> Any:  # pragma: no cover - never started
        raise RuntimeError("SettingsTaskRunner only chooses a runner; Prefect runs its duplicate()")


def task_runner(stage_kind: StageKind = "cpu", settings: Settings | RuntimeSettings | None = None) -> TaskRunner:
    """The task runner for a stage: from ``settings`` now, or (``None``) from the
    process settings when each run starts."""
    if settings is None:
        return SettingsTaskRunner(stage_kind)
    runtime = settings.runtime if isinstance(settings, Settings) else settings
    return build_task_runner(stage_kind, runtime)
