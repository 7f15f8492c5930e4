"""Prefect flows: wiring only (``python -m flows.<name>``, or the ``carflow`` command).

Importing this package (which happens before Prefect is imported by any flow module)
applies carflow's Prefect defaults, :data:`flows.entry.PREFECT_DEFAULTS`, so they reach
every temporary Prefect server a flow starts, also when a flow is imported without going
through an entry point (a worker, a test): the telemetry heartbeat is off (with it on,
each fresh ``PREFECT_HOME`` printed an ERROR traceback, "database is locked") and the
startup timeout is generous; Arrow uses the system allocator
(:data:`flows.entry.MEMORY_DEFAULTS`, before pyarrow is imported) and glibc keeps one malloc
arena per core (:func:`flows.entry.limit_malloc_arenas`); Prefect's per-task notice that a
thread task's timeout cannot interrupt a blocking call is dropped
(:func:`flows.entry.quiet_thread_timeout_notice`). A value you set yourself wins; a
server you run (docker-compose) is not affected.
"""

import os

from flows.entry import (
    MEMORY_DEFAULTS,
    PREFECT_DEFAULTS,
    limit_malloc_arenas,
    quiet_thread_timeout_notice,
)

for _name, _value in {**PREFECT_DEFAULTS, **MEMORY_DEFAULTS}.items():
    os.environ.setdefault(_name, _value)
limit_malloc_arenas()
quiet_thread_timeout_notice()
