"""The one error type for a user's mistake.

A :class:`UserError` is something the person running carflow can fix: a path that does
not exist, an input manifest that no stage has written yet, a bad argument. Its message
is one line that names what is missing and the command (or setting) that makes it. The
entry points (``carflow <command>``, ``python -m flows.<name>``) print that line and exit
2, without a traceback (``flows/entry.py``); Prefect does not retry a task that raised it.
"""

from __future__ import annotations


class UserError(Exception):
    """A user's mistake: the message names what is missing and how to make it."""

    exit_code = 2


class WeightsError(UserError, FileNotFoundError):
    """A configured model or weight file that does not exist or does not fit; the message
    names the setting (``car_filter.weights``, ``train.weights``…) and what it accepts."""


def is_user_error(exc: object) -> bool:
    return isinstance(exc, UserError)


def retry_unless_user_error(task: object, task_run: object, state: object) -> bool:
    """A Prefect ``retry_condition_fn``: retry a failed task unless it failed with a
    :class:`UserError` (a bad argument does not heal by waiting)."""
    exc = getattr(state, "data", None)
    if not isinstance(exc, BaseException):
        try:
            exc = state.result(raise_on_failure=False)  # type: ignore[attr-defined]
        except Exception:  # noqa: BLE001 - unknown: retry as before
            return True
    return not is_user_error(exc)
