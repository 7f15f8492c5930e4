"""What carflow changes in how Prefect's engine ends a flow run: one thing, applied by
:class:`flows.params.ParamsFlow` before each call (:func:`prompt_heartbeat_stop`).

Prefect 3's sync flow engine starts a heartbeat thread per flow run
(``flows.heartbeat_frequency``, 180 s by default: the ``prefect.flow-run.heartbeat``
events that zombie-run automations watch). That thread sleeps in 1 s steps, checking
its stop event between them, and the sync engine joins it when the run ends
(``prefect.flow_engine._send_heartbeats(engine, join_on_exit=True)``, up to 2 s). The
run's final state is already reported by then, yet the call returns only when the
thread wakes: each flow run, and each subflow of the nightly, ended 0–1 s late (a no-op
flow took 1.09 s instead of 0.10 s). The async engine does
not join it (``join_on_exit=False``); :func:`prompt_heartbeat_stop` makes the sync
engine do the same. Heartbeats are still sent as before, and the stopped thread (a
daemon) returns at its next 1 s step without sending anything more.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

log = logging.getLogger(__name__)

_PATCHED = "_carflow_no_join"


def prompt_heartbeat_stop() -> bool:
    """Stop joining the flow-run heartbeat thread at the end of a sync flow run (once per
    process; idempotent). Returns whether the engine is now set so; a Prefect whose engine
    has no such hook (another version) is left as it is."""
    try:
        from prefect import flow_engine
    except Exception:  # noqa: BLE001 - no Prefect engine to adjust
        return False
    send = getattr(flow_engine, "_send_heartbeats", None)
    if send is None:
        return False
    if getattr(send, _PATCHED, False):
        return True
    try:
        if "join_on_exit" not in inspect.signature(send).parameters:
            return False
    except (TypeError, ValueError):
        return False

    def send_heartbeats(engine: Any, join_on_exit: bool = True) -> Any:
        return send(engine, join_on_exit=False)

    setattr(send_heartbeats, _PATCHED, True)
    send_heartbeats.__wrapped__ = send  # type: ignore[attr-defined]
    flow_engine._send_heartbeats = send_heartbeats
    log.debug("flow-run heartbeat thread: not joined at the end of a run")
    return True
