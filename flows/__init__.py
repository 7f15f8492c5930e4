"""Prefect flows: wiring only (``python -m flows.<name>``, or the ``carflow`` command).

Every entry point imports this package before Prefect, so the one default set here
reaches every temporary Prefect server the flows start: the server's telemetry
heartbeat is off (``PREFECT_SERVER_ANALYTICS_ENABLED=false``). With it on, each fresh
``PREFECT_HOME`` printed an ERROR traceback ("database is locked": the heartbeat writes
to the SQLite database while it is being created) although the run completed. Set the
variable yourself to turn it back on; a server you run (docker-compose) is not affected.
"""

import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
