"""A small threaded HTTP server for a generated demo marketplace.

:class:`DemoSite` serves the files of a generated site folder on loopback, records every
requested path (with its query string) in ``requests_log`` — so tests can check what a
crawler asked for, e.g. that it read ``/robots.txt`` first and never touched ``/private/`` —
and can add a fixed latency to every response to behave like a remote site (the crawl
benchmark uses it).

Behaviour: ``GET``/``HEAD`` only; ``Content-Type`` from the file extension alone (so the
HTML page saved as ``.jpg`` is served as ``image/jpeg``, as a misconfigured CDN would);
``Content-Length`` always; 404 for anything missing or outside the root; HTTP/1.1 with
keep-alive; one daemon thread per connection; no logging to stderr.
"""

from __future__ import annotations

import posixpath
import socket
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from urllib.parse import unquote, urlsplit

CONTENT_TYPES: dict[str, str] = {
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".png": "image/png",
    ".gif": "image/gif",
    ".webp": "image/webp",
    ".html": "text/html; charset=utf-8",
    ".htm": "text/html; charset=utf-8",
    ".txt": "text/plain; charset=utf-8",
    ".json": "application/json",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
}
NOT_FOUND_BODY = b"<!DOCTYPE html><html><head><title>404 Not Found</title></head><body><h1>Not Found</h1></body></html>\n"


class _Server(ThreadingHTTPServer):
    """ThreadingHTTPServer with a deep accept queue and quiet error handling."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, addr: tuple[str, int], root: Path, latency_s: float, log: list[str] | None,
                 lock: threading.Lock):
        self.root = root
        self.latency_s = latency_s
        self.log = log
        self.log_lock = lock
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()
        super().__init__(addr, _Handler)

    def process_request(self, request, client_address) -> None:  # noqa: ANN001
        with self._open_lock:
            self._open.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request) -> None:  # noqa: ANN001
        with self._open_lock:
            self._open.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        """Hang up on idle keep-alive connections (their threads then end)."""
        with self._open_lock:
            conns = list(self._open)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def handle_error(self, request, client_address) -> None:  # noqa: ANN001
        """A client hanging up mid-response is normal for a crawler test; stay quiet."""


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    server_version = "DemoMotors/1.0"
    sys_version = ""
    #: idle keep-alive connections are closed after this many seconds
    timeout = 30
    #: headers and body go out as separate writes: without TCP_NODELAY, Nagle + delayed ACK
    #: would add ~40 ms to every keep-alive response
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass

    def _resolve(self) -> Path | None:
        path = unquote(urlsplit(self.path).path)
        norm = posixpath.normpath("/" + path.lstrip("/"))
        if path.endswith("/") and not norm.endswith("/"):
            norm += "/"
        rel = norm.lstrip("/")
        if not rel or rel.endswith("/"):
            rel += "index.html"
        root = self.server.root
        target = (root / rel).resolve()
        try:
            target.relative_to(root)
        except ValueError:
            return None
        return target if target.is_file() else None

    def _serve(self, with_body: bool) -> None:
        srv = self.server
        if srv.log is not None:
            with srv.log_lock:
                srv.log.append(self.path)
        if srv.latency_s > 0:
            time.sleep(srv.latency_s)
        target = self._resolve()
        if target is None:
            status, body, ctype = HTTPStatus.NOT_FOUND, NOT_FOUND_BODY, "text/html; charset=utf-8"
        else:
            status, body = HTTPStatus.OK, target.read_bytes()
            ctype = CONTENT_TYPES.get(target.suffix.lower(), "application/octet-stream")
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if with_body:
            self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802
        self._serve(True)

    def do_HEAD(self) -> None:  # noqa: N802
        self._serve(False)


class DemoSite:
    """Serve a generated demo site on ``host:port`` (port 0 = any free port) in a background
    thread. Use as a context manager::

        with DemoSite(site_dir) as site:
            requests.get(site.url + "/robots.txt")
            assert site.requests_log == ["/robots.txt"]
    """

    def __init__(self, root: str | Path, host: str = "127.0.0.1", port: int = 0, latency_ms: float = 0.0):
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise FileNotFoundError(f"demo site folder not found: {self.root}")
        self.host = host
        self.port = int(port)
        self.latency_ms = float(latency_ms)
        #: every requested path (with query string), in arrival order
        self.requests_log: list[str] = []
        self._lock = threading.Lock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """``http://HOST:PORT`` (no trailing slash); the real port once started."""
        return f"http://{self.host}:{self.port}"

    def start(self) -> DemoSite:
        if self._server is not None:
            return self
        self._server = _Server((self.host, self.port), self.root, self.latency_ms / 1000.0, self.requests_log, self._lock)
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name=f"demo-site:{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is not None:
            server.shutdown()
            server.close_connections()
            server.server_close()
        if thread is not None:
            thread.join(timeout=5)

    def clear_log(self) -> None:
        with self._lock:
            self.requests_log.clear()

    def __enter__(self) -> DemoSite:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def serve_forever(root: str | Path, host: str = "127.0.0.1", port: int = 8765, latency_ms: float = 0.0) -> None:
    """Serve ``root`` until interrupted (blocking; for the CLI)."""
    server = _Server((host, int(port)), Path(root).resolve(), float(latency_ms) / 1000.0, None, threading.Lock())
    try:
        server.serve_forever(poll_interval=0.25)
    finally:
        server.server_close()
