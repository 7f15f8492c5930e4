"""Prefect flows: wiring only (``python -m flows.<name>``, or the ``carflow`` command).

Importing this package (which happens before Prefect is imported by any flow module)
applies carflow's Prefect defaults, :data:`flows.entry.PREFECT_DEFAULTS`, so they reach
every temporary Prefect server a flow starts, also when a flow is imported without going
through an entry point (a worker, a test): the telemetry heartbeat is off (with it on,
each fresh ``PREFECT_HOME`` printed an ERROR traceback, "database is locked") and the
startup timeout is generous; Arrow uses the system allocator
(:data:`flows.entry.MEMORY_DEFAULTS`, before pyarrow is imported) and glibc keeps one malloc
arena per core and maps buffers of 1 MiB or more on their own (:func:`flows.entry.tune_malloc`); Prefect's per-task notice that a
thread task's timeout cannot interrupt a blocking call is dropped
(:func:`flows.entry.quiet_thread_timeout_notice`). A value you set yourself wins; a
server you run (docker-compose) is not affected.
"""

import os

from flows.entry import (
    MEMORY_DEFAULTS,
    PREFECT_DEFAULTS,
    quiet_thread_timeout_notice,
    tune_malloc,
)

for _name, _value in {**PREFECT_DEFAULTS, **MEMORY_DEFAULTS}.items():
    os.environ.setdefault(_name, _value)
tune_malloc()
quiet_thread_timeout_notice()
