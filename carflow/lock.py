"""A storage lock: one run at a time writes a storage's manifests and registry.

The nightly (``flows/pipeline.py``) holds :class:`StorageLock` ``pipeline`` for its whole
chain, so two runs started at the same time on the same storage (a schedule that fires
while last night's run is still going, a person starting one by hand) never write the
same manifest or registry version at once. The lock is one object in the storage itself,
``locks/<name>.json`` (:func:`carflow.keys.lock_key`), so it works across machines and
work pools without Prefect's server:

- **Atomic create.** Local storage: the record is written to a temp file, then
  ``os.link``-ed to the lock's path (fails when the path exists; readers never see a
  half-written lock). S3: ``put_object(..., IfNoneMatch="*")`` (a 412 when it exists).
- **Owner and lease.** The record names the owner (``host:pid:random``, plus a label such
  as the flow run), ``acquired_at``, ``renewed_at`` and ``expires_at``. A heartbeat thread
  renews it every third of ``runtime.lock_lease_s``; S3 renewals are compare-and-swap
  (``IfMatch`` on the ETag), so a run never overwrites a lock that another run took over.
- **Stale takeover.** A run that was killed stops renewing: once ``expires_at`` has
  passed, the next run takes the lock over (S3: ``IfMatch`` on the stale ETag; local: under
  an ``O_EXCL`` break file), logging whose lock it replaced. Clocks of the machines must
  agree to well within the lease (NTP).
- **Waiting, then one line.** A second run waits up to ``runtime.lock_wait_s`` (polling
  every ``runtime.lock_poll_s``), because a scheduled run would rather start late than not
  at all; then it stops with :class:`LockHeld` (a ``UserError``: one line, exit 2) naming
  the holder, since when, and when its lease ends.
- **Release on exit**, only when the lock is still this run's. A run whose lock was taken
  over while it ran (it did not renew for a whole lease) fails with :class:`LockLost`.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any

from carflow.errors import UserError
from carflow.keys import lock_key
from carflow.storage import LocalStorage, S3Storage, Storage

log = logging.getLogger(__name__)


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class LockRecord:
    """What the lock object holds."""

    name: str
    owner: str
    label: str
    host: str
    pid: int
    acquired_at: float
    renewed_at: float
    expires_at: float

    def to_bytes(self) -> bytes:
        doc = {**asdict(self), "acquired": _iso(self.acquired_at), "expires": _iso(self.expires_at)}
        return json.dumps(doc, indent=2, sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> LockRecord:
        doc = json.loads(data)
        return cls(**{k: doc[k] for k in cls.__dataclass_fields__})

    def describe(self) -> str:
        who = f"{self.label} ({self.owner})" if self.label else self.owner
        return f"{who} since {_iso(self.acquired_at)}, lease until {_iso(self.expires_at)}"


class LockHeld(UserError):
    """Another run holds the lock and did not release it within ``runtime.lock_wait_s``."""

    def __init__(self, message: str, holder: LockRecord | None = None, waited_s: float = 0.0):
        super().__init__(message)  # the message alone rebuilds it (Prefect pickles a run's exception)
        self.holder, self.waited_s = holder, waited_s

    @classmethod
    def of(cls, uri: str, holder: LockRecord, waited_s: float) -> LockHeld:
        return cls(f"{uri} is held by {holder.describe()}: another run is writing this storage "
                   f"(waited {waited_s:.0f} s, runtime.lock_wait_s / CARFLOW_RUNTIME__LOCK_WAIT_S); "
                   f"run again when it is done (a killed run's lock goes stale at its lease end)",
                   holder, waited_s)


class LockLost(RuntimeError):
    """The lock was taken over while this run held it (it missed a whole lease of renewals)."""


# ---------------------------------------------------------------------------------------
# atomic primitives per backend: create-if-absent, read with a token, compare-and-swap
# ---------------------------------------------------------------------------------------
class _LocalLockFile:
    def __init__(self, storage: LocalStorage, key: str):
        self.path = storage.root / key
        self.breaker = self.path.with_name(self.path.name + ".break")

    def create(self, data: bytes) -> Any:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".tmp-{self.path.name}.{uuid.uuid4().hex}")
        tmp.write_bytes(data)
        try:
            os.link(tmp, self.path)  # atomic, fails when the lock exists
        except FileExistsError:
            return None
        finally:
            tmp.unlink(missing_ok=True)
        return data

    def read(self) -> tuple[bytes, Any] | None:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        return data, data  # the content is the token: it holds the owner and a new renewed_at

    def swap(self, data: bytes, token: Any) -> Any:
        """Replace the lock when it still holds ``token``, under the break file (one
        swapper at a time)."""
        try:
            fd = os.open(self.breaker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            self._clear_stale_breaker()
            return None
        os.close(fd)
        try:
            current = self.read()
            if current is None or current[1] != token:
                return None
            tmp = self.path.with_name(f".tmp-{self.path.name}.{uuid.uuid4().hex}")
            tmp.write_bytes(data)
            os.replace(tmp, self.path)
            return data
        finally:
            self.breaker.unlink(missing_ok=True)

    def _clear_stale_breaker(self, older_than_s: float = 60.0) -> None:
        try:
            if time.time() - self.breaker.stat().st_mtime > older_than_s:  # its swapper was killed
                self.breaker.unlink(missing_ok=True)
        except FileNotFoundError:
            pass

    def delete(self, token: Any) -> None:
        current = self.read()
        if current is not None and current[1] == token:
            self.path.unlink(missing_ok=True)


class _S3LockObject:
    #: S3 answers a failed condition with 412, or 409 when two conditional writes race
    CONFLICT = ("PreconditionFailed", "ConditionalRequestConflict", "412", "409")

    def __init__(self, storage: S3Storage, key: str):
        self.storage, self.key = storage, storage._key(key)

    def _conditional(self, **kw: Any) -> Any:
        from botocore.exceptions import ClientError

        try:
            return self.storage.client.put_object(Bucket=self.storage.bucket, Key=self.key,
                                                  ContentType="application/json", **kw)["ETag"]
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in self.CONFLICT:
                return None
            raise

    def create(self, data: bytes) -> Any:
        return self._conditional(Body=data, IfNoneMatch="*")

    def read(self) -> tuple[bytes, Any] | None:
        from botocore.exceptions import ClientError

        try:
            got = self.storage.client.get_object(Bucket=self.storage.bucket, Key=self.key)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
                return None
            raise
        return got["Body"].read(), got["ETag"]

    def swap(self, data: bytes, token: Any) -> Any:
        return self._conditional(Body=data, IfMatch=token)

    def delete(self, token: Any) -> None:
        """Delete the lock while it holds ``token``: a conditional delete where the endpoint
        has one, else read, compare, delete."""
        from botocore.exceptions import ClientError

        client, bucket = self.storage.client, self.storage.bucket
        try:
            client.delete_object(Bucket=bucket, Key=self.key, IfMatch=token)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code")
            if code in (*self.CONFLICT, "NoSuchKey", "404"):
                return
            current = self.read()  # e.g. NotImplemented: an S3 without conditional deletes
            if current is not None and current[1] == token:
                client.delete_object(Bucket=bucket, Key=self.key)


def _backend(storage: Storage, key: str) -> _LocalLockFile | _S3LockObject:
    if isinstance(storage, LocalStorage):
        return _LocalLockFile(storage, key)
    if isinstance(storage, S3Storage):
        return _S3LockObject(storage, key)
    raise TypeError(f"no atomic lock for {type(storage).__name__}")


# ---------------------------------------------------------------------------------------
# the lock
# ---------------------------------------------------------------------------------------
class StorageLock:
    """``with StorageLock(storage, "pipeline", wait_s=..., lease_s=...) as lock:`` holds
    ``locks/pipeline.json`` for the block (see the module docstring). ``lock.waited_s``,
    ``lock.took_over`` (the stale record it replaced) and :meth:`summary` say what happened."""

    def __init__(self, storage: Storage, name: str = "pipeline", *, label: str = "", wait_s: float = 3600.0,
                 lease_s: float = 300.0, poll_s: float = 5.0, logger: Any = None):
        if lease_s <= 0 or poll_s <= 0 or wait_s < 0:
            raise ValueError("lock lease and poll must be > 0, wait >= 0")
        self.storage, self.name, self.label = storage, name, label
        self.key = lock_key(name)
        self.uri = storage.uri(self.key)
        self.wait_s, self.lease_s, self.poll_s = wait_s, lease_s, poll_s
        self.log = logger or log
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._obj = _backend(storage, self.key)
        self._token: Any = None
        self._record: LockRecord | None = None
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None
        self._mutex = threading.Lock()
        self.lost: LockRecord | None = None
        self.took_over: LockRecord | None = None
        self.waited_s = 0.0
        self.acquired_at: float | None = None
        self.released_at: float | None = None

    @classmethod
    def from_settings(cls, storage: Storage, runtime: Any, name: str = "pipeline", **kw: Any) -> StorageLock:
        """The lock with ``runtime.lock_wait_s`` / ``lock_lease_s`` / ``lock_poll_s``."""
        return cls(storage, name, wait_s=runtime.lock_wait_s, lease_s=runtime.lock_lease_s,
                   poll_s=runtime.lock_poll_s, **kw)

    # -- records ---------------------------------------------------------------------
    def _new_record(self, acquired_at: float | None = None) -> LockRecord:
        now = time.time()
        return LockRecord(self.name, self.owner, self.label, socket.gethostname(), os.getpid(),
                          acquired_at or now, now, now + self.lease_s)

    def holder(self) -> LockRecord | None:
        """The lock's current record (anyone's), or None when it is free."""
        got = self._obj.read()
        return LockRecord.from_bytes(got[0]) if got else None

    # -- acquire / renew / release ----------------------------------------------------
    def acquire(self) -> StorageLock:
        start = time.monotonic()
        announced = None
        while True:
            record = self._new_record()
            token = self._obj.create(record.to_bytes())
            if token is not None:
                return self._held(record, token, start)
            got = self._obj.read()
            if got is None:
                continue  # released in between: try again at once
            current = LockRecord.from_bytes(got[0])
            if current.expires_at < time.time():
                token = self._obj.swap(record.to_bytes(), got[1])
                if token is not None:
                    self.took_over = current
                    self.log.warning("took over the stale lock %s of %s (not renewed since %s)", self.uri,
                                     current.owner, _iso(current.renewed_at))
                    return self._held(record, token, start)
                continue
            waited = time.monotonic() - start
            if waited >= self.wait_s:
                raise LockHeld.of(self.uri, current, waited)
            if announced != current.owner:
                announced = current.owner
                self.log.warning("waiting up to %.0f s for %s, held by %s", self.wait_s - waited, self.uri,
                                 current.describe())
            time.sleep(max(0.01, min(self.poll_s, self.wait_s - waited,
                                     current.expires_at - time.time() + 0.01)))

    def _held(self, record: LockRecord, token: Any, start: float) -> StorageLock:
        self._record, self._token = record, token
        self.waited_s = time.monotonic() - start
        # held from here (the create or swap has returned) until release() issues the delete
        self.acquired_at, self.released_at = time.time(), None
        self._stop.clear()
        self._beat = threading.Thread(target=self._heartbeat, name=f"lock-{self.name}", daemon=True)
        self._beat.start()
        self.log.info("holding %s (%s)", self.uri, self.owner)
        return self

    def renew(self) -> bool:
        """Extend the lease (compare-and-swap on this run's token); False when lost."""
        with self._mutex:
            if self._record is None or self.lost:
                return False
            record = self._new_record(self._record.acquired_at)
            token = self._obj.swap(record.to_bytes(), self._token)
            if token is None:
                got = self._obj.read()
                current = LockRecord.from_bytes(got[0]) if got else None
                if current is not None and current.owner == self.owner:
                    return True  # a local swap collided with a reader of the break file: next beat
                self.lost = current or self._record
                self.log.error("lost %s: taken over by %s", self.uri, current.describe() if current else "nobody")
                return False
            self._record, self._token = record, token
            return True

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.lease_s / 3):
            try:
                if not self.renew():
                    return
            except Exception as exc:  # noqa: BLE001 - storage hiccup: the next beat tries again
                self.log.warning("could not renew %s: %s", self.uri, exc)

    def release(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
            self._beat = None
        with self._mutex:
            self.released_at = time.time()
            if self._record is not None and not self.lost:
                self._obj.delete(self._token)
            self._record = None
        if self.lost:
            raise LockLost(f"{self.uri} was taken over by {self.lost.owner} while this run held it (no renewal "
                           f"for runtime.lock_lease_s={self.lease_s:g} s): rerun, its outputs may be mixed")

    @property
    def record(self) -> LockRecord | None:
        return self._record

    def summary(self) -> dict[str, Any]:
        """What the run can report: the key, owner, wait, the stale lock it replaced."""
        return {"lock": self.uri, "owner": self.owner, "waited_s": round(self.waited_s, 3),
                "acquired_at": self.acquired_at, "released_at": self.released_at,
                "took_over": self.took_over.owner if self.took_over else None}

    def __enter__(self) -> StorageLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _storage_argument(bound: dict[str, Any]) -> Any:
    """The storage a flow writes: its ``storage`` argument, or the ``storage`` field of a
    parameter model among its arguments; None means the settings' storage."""
    if "storage" in bound:
        return bound["storage"]
    for value in bound.values():
        if hasattr(value, "storage"):
            return value.storage
    return None


def _run_label(default: str) -> str:
    """``<flow> run <name>`` of the current Prefect flow run (an optional nicety: the lock
    itself needs no Prefect), else ``default``."""
    try:
        from prefect.runtime import flow_run

        return f"{flow_run.flow_name} run {flow_run.name}" if flow_run.name else default
    except Exception:  # noqa: BLE001
        return default


def _run_logger() -> Any:
    try:
        from prefect import get_run_logger

        return get_run_logger()
    except Exception:  # noqa: BLE001 - outside a flow run
        return log


def storage_locked(name: str = "pipeline") -> Any:
    """Decorator: hold :class:`StorageLock` ``name`` on the function's storage (its
    ``storage`` argument; the settings' storage when None) for the whole call, with the
    ``runtime.lock_*`` settings; a dict result gets ``"lock": lock.summary()``."""
    import functools
    import inspect

    def wrap(fn: Any) -> Any:
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def locked(*args: Any, **kwargs: Any) -> Any:
            from carflow.settings import get_settings
            from carflow.storage import open_storage

            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            storage = open_storage(_storage_argument(bound.arguments))
            lock = StorageLock.from_settings(storage, get_settings().runtime, name,
                                             label=_run_label(fn.__name__), logger=_run_logger())
            with lock:
                result = fn(*args, **kwargs)
            return {**result, "lock": lock.summary()} if isinstance(result, dict) else result

        # the wrapper lives in this module: give Prefect (which validates the flow's parameters
        # from the signature) resolved annotations, not names only fn's module can resolve
        locked.__signature__ = inspect.signature(fn, eval_str=True)  # type: ignore[attr-defined]
        locked.__annotations__ = {name: p.annotation for name, p in locked.__signature__.parameters.items()
                                  if p.annotation is not inspect.Parameter.empty}
        return locked

    return wrap
