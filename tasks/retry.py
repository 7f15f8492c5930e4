"""The one retry policy of every task that touches the network or storage.

``@task(**RETRY.io())`` gives a task retries with exponential backoff and jitter
(Prefect's ``exponential_backoff`` and ``retry_jitter_factor``), a timeout per attempt,
and :func:`retry_if_transient` as its ``retry_condition_fn``: bad input (a
:class:`~carflow.errors.UserError`, a ``ValueError`` or ``TypeError``) fails at once,
because waiting does not heal it. The numbers are ``runtime.retries``,
``runtime.retry_backoff_s``, ``runtime.retry_jitter`` and ``runtime.task_timeout_s``.

Under this policy every S3 request has its own tries and timeouts (``storage.max_attempts``,
``storage.connect_timeout_s``, ``storage.read_timeout_s``: :class:`carflow.storage.S3Storage`),
so a short outage is usually absorbed inside one attempt, and a longer one by these
retries (``tests/test_faults.py``).

A decorator runs at import time, when no settings are read, so ``RETRY`` holds the
settings' defaults; :func:`with_retry_policy` re-applies the configured values to a task
when a flow runs (``tasks.shards.run_shards`` does it for every shard task).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prefect.tasks import exponential_backoff

from carflow.errors import UserError
from carflow.settings import RuntimeSettings

#: errors that do not heal by waiting: bad input or a bad argument
NOT_TRANSIENT: tuple[type[BaseException], ...] = (UserError, ValueError, TypeError)


def _exception(state: Any) -> BaseException | None:
    try:
        exc = state.result(raise_on_failure=False)
    except Exception as caught:  # noqa: BLE001 - the state raised its exception
        return caught
    return exc if isinstance(exc, BaseException) else None


def retry_if_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry unless the attempt failed on bad input."""
    return not isinstance(_exception(state), NOT_TRANSIENT)


@dataclass(frozen=True)
class RetryPolicy:
    retries: int
    backoff_s: float
    jitter: float
    timeout_s: float | None

    @classmethod
    def from_settings(cls, runtime: RuntimeSettings | None = None) -> RetryPolicy:
        r = runtime if runtime is not None else RuntimeSettings()
        return cls(r.retries, r.retry_backoff_s, r.retry_jitter, r.task_timeout_s)

    def io(self) -> dict[str, Any]:
        """Task options for a task that touches the network or storage."""
        return {
            "retries": self.retries,
            "retry_delay_seconds": exponential_backoff(backoff_factor=self.backoff_s),
            "retry_jitter_factor": self.jitter,
            "retry_condition_fn": retry_if_transient,
            "timeout_seconds": self.timeout_s,
        }

    def cpu(self) -> dict[str, Any]:
        """Task options for a pure computation in memory: no retries (it fails the same
        way twice), the same timeout."""
        return {"retries": 0, "timeout_seconds": self.timeout_s}


#: the settings' defaults, for decorators (nothing is read at import time)
RETRY = RetryPolicy.from_settings()


def with_retry_policy(task: Any, runtime: RuntimeSettings) -> Any:
    """``task`` with the configured retries and timeout, if it was decorated with
    ``RETRY.io()`` (a task with options of its own keeps them)."""
    policy = RetryPolicy.from_settings(runtime)
    if policy == RETRY or task.retry_condition_fn is not retry_if_transient:
        return task
    return task.with_options(**policy.io())
