"""An ASGI app under real uvicorn on a free loopback port, in a thread (``make demo``
starts the prediction API this way and sends it a photo)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _forks() -> set[int]:
    """This process's children that are forks of it (same command line, never exec'd)."""
    import psutil

    me = psutil.Process()
    out = set()
    for child in me.children():
        try:
            if child.cmdline() == me.cmdline():
                out.add(child.pid)
        except psutil.Error:
            continue
    return out


def _kill(pids: set[int]) -> None:
    import psutil

    for pid in pids:
        try:
            psutil.Process(pid).kill()
        except psutil.Error:
            continue


@contextlib.contextmanager
def running(app: Any, ready: bool = True, timeout: float = 120.0, reap_forks: bool = False) -> Iterator[str]:
    """``app`` under uvicorn on a free loopback port; yields the base URL once ``/health``
    (and, with ``ready``, ``/ready``: the models are loaded and warm) answers 200.

    ``reap_forks``: on the way out, SIGKILL the forks of this process made while the app
    ran. Loading and warming the models forks children of this multi-threaded process
    (seen in `make demo`: 2-7 single-threaded forks asleep on a lock they inherited, deaf
    to SIGTERM) that never exit, and the interpreter waits for them at exit forever."""
    import httpx
    import uvicorn

    before = _forks() if reap_forks else set()

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    path = "/ready" if ready else "/health"
    try:
        while True:
            try:
                if httpx.get(base + path, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError(f"{base}{path} did not answer 200 within {timeout}s")
            time.sleep(0.05)
        yield base
    finally:
        server.should_exit = True
        thread.join(15)
        if reap_forks:
            _kill(_forks() - before)
