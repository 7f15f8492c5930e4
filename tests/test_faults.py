"""Fault tolerance on the demo marketplace (issue 13): each fault ends with the same
final manifest as a clean run, with no duplicated and no lost rows.

- **S3 outage:** the S3 endpoint goes down mid-stage (listening socket closed, open
  connections cut) right after the clean stage stored its first shard, and comes back on
  the same port a few seconds later; the retries (botocore's, then ``RETRY.io()``'s
  Prefect retries) carry the run through.
- **Process kill:** ``python -m flows.clean`` is SIGKILLed while shards are being written,
  then rerun: the finished shards are reused and only the missing ones are computed.
- **Training kill:** ``tests/test_train.py::test_sigkilled_run_resumes_from_its_s3_checkpoint``
  (SIGKILL mid-epoch, the rerun resumes from the checkpoint in S3); not repeated here.
- **Concurrent runs:** two ``nightly`` runs started together on one storage are
  serialised by the storage lock (``carflow/lock.py``): the second waits, the manifests
  equal an uncontended run's, the registry holds one complete dataset version. The
  lock itself is tested on both backends: exclusive, released, renewed, a killed holder's
  lock taken over after its lease, a run that lost its lock told so.

The S3 faults run against a moto server inside this process (:class:`FaultyS3`): its
buckets live in moto's in-process backend, so a server stopped and started again on the
same port keeps them, and its WSGI app can watch or hold back requests, so every fault
starts at an observable point (a shard's stats object stored), not after a sleep.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from carflow.keys import lock_key, manifest_key
from carflow.lock import LockHeld, LockLost, StorageLock
from carflow.manifest import to_pandas
from carflow.storage import open_storage

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
#: images per clean shard: the small site's photos make about 7 shards
SHARD = 10
STATS = re.compile(r"/work/inspect/[^/]+\.stats\.json$")


# ---------------------------------------------------------------------------------------
# a moto S3 endpoint that can fail
# ---------------------------------------------------------------------------------------
class FaultyS3:
    """A moto S3 server in this process that can go down and come back on the same port,
    and whose WSGI app sees every request: ``after_put(pattern, fn)`` calls ``fn`` after a
    matching PUT was stored; ``hold_puts(pattern, allow)`` lets ``allow`` matching PUTs
    through, then holds the next ones until :meth:`drop_held` answers them with a 503 (their
    client is gone), storing nothing."""

    def __init__(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._server = None
        self._thread: threading.Thread | None = None
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._after: list[tuple[re.Pattern, object]] = []
        self._hold: tuple[re.Pattern, int] | None = None
        self.stored: dict[str, int] = {}  # pattern → matching PUTs stored
        self.held = 0
        self._release = threading.Event()
        self.down_events = 0

    # -- the app -------------------------------------------------------------------
    def _app(self):
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app

        moto_app = DomainDispatcherApplication(create_backend_app)

        def app(environ, start_response):
            path, method = environ.get("PATH_INFO", ""), environ["REQUEST_METHOD"]
            if method == "PUT" and self._hold and self._hold[0].search(path):
                with self._lock:
                    passed = self.stored.get(self._hold[0].pattern, 0)
                    hold = passed >= self._hold[1]
                    if hold:
                        self.held += 1
                if hold:
                    self._release.wait()
                    environ["wsgi.input"].read()
                    start_response("503 Service Unavailable", [("Content-Type", "application/xml")])
                    return [b"<Error><Code>SlowDown</Code></Error>"]
            status: list[str] = []

            def capture(s, headers, exc_info=None):
                status.append(s)
                return start_response(s, headers, exc_info)

            body = moto_app(environ, capture)
            if method == "PUT" and status and status[0].startswith("200"):
                # counted first: a hook may read the count at once (from another thread)
                for pattern in {p for p, _ in self._after} | ({self._hold[0]} if self._hold else set()):
                    if pattern.search(path):
                        with self._lock:
                            self.stored[pattern.pattern] = self.stored.get(pattern.pattern, 0) + 1
                for pattern, fn in list(self._after):
                    if pattern.search(path):
                        fn(path)
            return body

        return app

    def after_put(self, pattern: re.Pattern, fn) -> None:
        self._after.append((pattern, fn))

    def hold_puts(self, pattern: re.Pattern, allow: int) -> None:
        self._hold = (pattern, allow)

    def drop_held(self) -> None:
        self._hold = None
        self._release.set()

    # -- up / down -----------------------------------------------------------------
    def start(self) -> FaultyS3:
        from moto.moto_server.werkzeug_app import MotoRequestHandler
        from werkzeug.serving import make_server

        conns, lock = self._conns, self._lock

        class Handler(MotoRequestHandler):
            def setup(self):
                super().setup()
                with lock:
                    conns.add(self.connection)

            def finish(self):
                with lock:
                    conns.discard(self.connection)
                super().finish()

            def log_request(self, *args, **kwargs):  # one line per request is noise here
                pass

        self._server = make_server("127.0.0.1", self.port, self._app(), threaded=True, request_handler=Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Down: no new connection is accepted (refused) and open ones are cut."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
        with self._lock:
            for conn in list(self._conns):
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        self.down_events += 1

    def bucket(self) -> str:
        import boto3

        name = f"faults-{uuid.uuid4().hex[:10]}"
        boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1").create_bucket(Bucket=name)
        return name


@pytest.fixture
def faulty_s3(monkeypatch):
    """A :class:`FaultyS3` that the settings' S3 endpoint points at."""
    from carflow.settings import reset_settings

    server = FaultyS3().start()
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1", "CARFLOW_STORAGE__ENDPOINT_URL": server.endpoint}.items():
        monkeypatch.setenv(k, v)
    reset_settings()
    yield server
    server.drop_held()
    try:
        server.stop()
    except Exception:  # noqa: BLE001 - already down
        pass
    reset_settings()


# ---------------------------------------------------------------------------------------
# the demo marketplace, crawled once, and its clean manifest from an undisturbed run
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_site(tmp_path_factory):
    """A small demo marketplace (8 listings, 3 classes: about 65 photos, planted problems
    included) served on loopback."""
    from demo.generate import generate_site
    from demo.server import DemoSite

    out = tmp_path_factory.mktemp("faults-site")
    generate_site(out, seed=1, n_listings=8, n_classes=3)
    with DemoSite(out) as site:
        yield site


@pytest.fixture(scope="module")
def crawled(small_site, tmp_path_factory, crawl_to_manifest) -> str:
    return crawl_to_manifest(small_site.url, str(tmp_path_factory.mktemp("faults-crawl")))


def _copy_inputs(src_uri: str, dest_uri: str) -> None:
    src, dest = open_storage(src_uri), open_storage(dest_uri)
    for key in list(src.list("raw/")) + [manifest_key("ingest")]:
        dest.put(key, src.get(key))


def _rows(uri: str, stage: str = "clean"):
    """A manifest's rows sorted by their key (compared whole: a fault must not change any column)."""
    df = to_pandas(pq.read_table(io.BytesIO(open_storage(uri).get(manifest_key(stage)))))
    return df.sort_values(["listing_id", "photo_index"], kind="stable").reset_index(drop=True)


def _assert_same_rows(rows, want) -> None:
    keys = list(zip(rows["listing_id"], rows["photo_index"], strict=True))
    assert len(keys) == len(set(keys)), "duplicated rows"
    assert len(rows) == len(want), "lost or extra rows"
    assert list(rows.columns) == list(want.columns)
    assert rows.equals(want), rows.compare(want)


@pytest.fixture(scope="module")
def reference(crawled, tmp_path_factory, prefect_server) -> dict:
    """The clean stage run once without faults: its summary, rows and shard plan."""
    from flows.clean import clean

    uri = str(tmp_path_factory.mktemp("faults-reference"))
    _copy_inputs(crawled, uri)
    summary = clean(storage=uri, shard_size=SHARD)
    return {"summary": summary, "rows": _rows(uri)}


def _assert_same_manifest(uri: str, reference: dict) -> None:
    _assert_same_rows(_rows(uri), reference["rows"])


# ---------------------------------------------------------------------------------------
# S3 outage
# ---------------------------------------------------------------------------------------
OUTAGE_S = 4.0


def test_an_s3_outage_mid_stage_is_carried_through_by_the_retries(faulty_s3, crawled, reference, prefect_server):
    from flows.clean import clean

    uri = f"s3://{faulty_s3.bucket()}/run"
    _copy_inputs(crawled, uri)
    shards = reference["summary"]["shards"]
    assert shards >= 4
    outage: dict = {}

    def go_down(_path: str) -> None:
        if outage:
            return
        outage["stored_before"] = None

        def down_and_up() -> None:
            faulty_s3.stop()
            outage["stored_before"] = faulty_s3.stored[STATS.pattern]
            outage["down_at"] = time.monotonic()
            time.sleep(OUTAGE_S)  # the outage itself: how long the endpoint is away
            faulty_s3.start()
            outage["up_at"] = time.monotonic()

        outage["thread"] = threading.Thread(target=down_and_up, daemon=True)
        outage["thread"].start()

    faulty_s3.after_put(STATS, go_down)
    summary = clean(storage=uri, shard_size=SHARD)
    finished = time.monotonic()
    outage["thread"].join()

    assert faulty_s3.down_events == 1
    # the endpoint went down with most shards still to write: they were written after it came back
    assert outage["stored_before"] < shards - 1
    assert finished > outage["up_at"]
    assert summary["shards"] == shards and summary["cached_shards"] == 0
    assert len([k for k in open_storage(uri).list("work/inspect/") if k.endswith(".stats.json")]) == shards
    _assert_same_manifest(uri, reference)


def test_a_hanging_endpoint_fails_a_try_after_the_read_timeout(monkeypatch):
    """An endpoint that accepts connections and never answers: each try ends after
    ``storage.read_timeout_s`` (a setting), so the retries get their turn instead of a
    request hanging for botocore's default minute."""
    from botocore.exceptions import ReadTimeoutError

    from carflow.settings import reset_settings
    from carflow.storage import StorageError

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                     "CARFLOW_STORAGE__ENDPOINT_URL": f"http://127.0.0.1:{silent.getsockname()[1]}",
                     "CARFLOW_STORAGE__READ_TIMEOUT_S": "0.5", "CARFLOW_STORAGE__CONNECT_TIMEOUT_S": "2",
                     "CARFLOW_STORAGE__MAX_ATTEMPTS": "2"}.items():
            monkeypatch.setenv(k, v)
        reset_settings()
        try:
            store = open_storage("s3://hangs/run")
            config = store.client.meta.config
            assert (config.read_timeout, config.connect_timeout) == (0.5, 2.0)
            assert config.retries["total_max_attempts"] == 2
            with pytest.raises((ReadTimeoutError, StorageError)):
                store.get("manifests/clean/manifest.parquet")
        finally:
            monkeypatch.undo()
            reset_settings()


# ---------------------------------------------------------------------------------------
# process kill
# ---------------------------------------------------------------------------------------
def _last_json(stdout: str) -> dict:
    lines = stdout.splitlines()
    start = max(i for i, ln in enumerate(lines) if ln == "{")
    return json.loads("\n".join(lines[start:]))


# two `python -m flows.clean` processes: 63-77 s on the shared 2-core machine (default tier: issue 13's kill test)
def test_a_killed_clean_run_reuses_its_finished_shards(faulty_s3, crawled, reference, prefect_server):
    """SIGKILL ``python -m flows.clean`` while it waits on a shard write (the endpoint holds
    every stats PUT after the first two), rerun the same command: the two finished
    shards are reused, only the others are computed, the manifest is the reference's."""
    from prefect.settings import PREFECT_API_URL

    uri = f"s3://{faulty_s3.bucket()}/run"
    _copy_inputs(crawled, uri)
    store = open_storage(uri)
    done = 2
    faulty_s3.hold_puts(STATS, allow=done)
    cmd = [sys.executable, "-m", "flows.clean", "--storage", uri, "--shard-size", str(SHARD)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PREFECT_API_URL": PREFECT_API_URL.value(),
           "PYTHONUNBUFFERED": "1"}
    first = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        while faulty_s3.held == 0 and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert faulty_s3.held > 0, first.stdout.read()[-3000:] if first.poll() is not None else "no shard held"
        os.kill(first.pid, signal.SIGKILL)
    finally:
        if first.poll() is None:
            first.kill()
        first.wait()
        faulty_s3.drop_held()
    stats = [k for k in store.list("work/inspect/") if k.endswith(".stats.json")]
    assert len(stats) == done and not store.exists(manifest_key("clean"))
    reused_images = sum(json.loads(store.get(k))["images"] for k in stats)

    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    out = _last_json(again.stdout)
    ref = reference["summary"]
    assert out["shards"] == ref["shards"] and out["cached_shards"] == done
    assert out["inspected_images"] == ref["inspected_images"] - reused_images
    _assert_same_manifest(uri, reference)


# ---------------------------------------------------------------------------------------
# the storage lock
# ---------------------------------------------------------------------------------------
def _lock(uri: str, **kw) -> StorageLock:
    return StorageLock(open_storage(uri), "pipeline", **{"wait_s": 0, "lease_s": 30, "poll_s": 0.05, **kw})


def test_the_lock_is_exclusive_names_its_holder_and_is_released(storage_uri):
    store = open_storage(storage_uri)
    first = _lock(storage_uri, label="nightly run brave-owl").acquire()
    assert store.exists(lock_key("pipeline"))
    with pytest.raises(LockHeld) as err:
        _lock(storage_uri).acquire()
    msg = str(err.value)
    assert "\n" not in msg and "nightly run brave-owl" in msg and first.owner in msg
    assert "since " in msg and "lease until" in msg and "CARFLOW_RUNTIME__LOCK_WAIT_S" in msg
    first.release()
    assert not store.exists(lock_key("pipeline"))
    with _lock(storage_uri) as second:
        assert second.holder().owner == second.owner
    assert not store.exists(lock_key("pipeline"))


def test_a_waiting_run_gets_the_lock_once_the_holder_releases_it(storage_uri):
    holder = _lock(storage_uri).acquire()
    got: dict = {}
    waiter = threading.Thread(target=lambda: got.setdefault("lock", _lock(storage_uri, wait_s=60).acquire()))
    waiter.start()
    holder.release()
    waiter.join(60)
    lock = got["lock"]
    assert lock.acquired_at >= holder.released_at
    assert lock.holder().owner == lock.owner
    lock.release()


def test_racing_runs_get_the_lock_once(local_uri):
    """Eight runs at once on a folder: exactly one holds the lock (os.link is atomic)."""
    winners, barrier = [], threading.Barrier(8)

    def race() -> None:
        lock = _lock(local_uri)
        barrier.wait()
        try:
            winners.append(lock.acquire())
        except LockHeld:
            pass

    threads = [threading.Thread(target=race) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(winners) == 1
    winners[0].release()


def test_the_heartbeat_keeps_a_long_run_s_lock(storage_uri):
    lock = _lock(storage_uri, lease_s=2.0).acquire()
    try:
        first = lock.holder()
        seen = [first.renewed_at]
        deadline = time.monotonic() + 60
        while len(seen) < 4 and time.monotonic() < deadline:  # three renewals: over a lease held
            renewed = lock.holder().renewed_at
            if renewed != seen[-1]:
                seen.append(renewed)
            time.sleep(0.02)
        assert len(seen) == 4 and seen == sorted(seen)
        assert lock.holder().acquired_at == first.acquired_at
        with pytest.raises(LockHeld):  # just renewed: a whole lease left
            _lock(storage_uri).acquire()
    finally:
        lock.release()


HOLD_SCRIPT = """
import sys, time
from carflow.lock import StorageLock
from carflow.storage import open_storage
lock = StorageLock(open_storage(sys.argv[1]), "pipeline", label="doomed", lease_s=float(sys.argv[2])).acquire()
print(lock.owner, flush=True)
time.sleep(600)
"""


def test_a_killed_run_s_lock_goes_stale_and_is_taken_over(storage_uri):
    proc = subprocess.Popen([sys.executable, "-c", HOLD_SCRIPT, storage_uri, "1.5"], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE, text=True)
    try:
        owner = proc.stdout.readline().strip()
        assert owner, "the holder did not start"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    with _lock(storage_uri, wait_s=30) as lock:
        assert lock.took_over is not None and lock.took_over.owner == owner
        assert lock.took_over.pid == proc.pid and lock.took_over.label == "doomed"
        assert lock.acquired_at >= lock.took_over.expires_at  # only once its lease had passed


def test_a_run_that_lost_its_lock_is_told_and_leaves_the_new_lock(storage_uri):
    paused = _lock(storage_uri, lease_s=0.5).acquire()
    paused._stop.set()  # a stalled process: no more heartbeats
    paused._beat.join()
    with _lock(storage_uri, wait_s=30) as other:
        assert other.took_over.owner == paused.owner
        assert paused.renew() is False
        with pytest.raises(LockLost, match="taken over"):
            paused.release()
        assert other.holder().owner == other.owner  # untouched by the loser's release


def test_a_second_nightly_stops_with_one_line_naming_the_holder(local_uri, prefect_server):
    """``lock_wait_s=0``: the second run does not wait; the command prints one line, exit 2."""
    from prefect.settings import PREFECT_API_URL

    with _lock(local_uri, label="nightly run brave-owl"):
        res = subprocess.run(
            [sys.executable, "-m", "flows.pipeline", "--storage", local_uri], cwd=ROOT, capture_output=True,
            text=True, timeout=300,
            env={**os.environ, "PYTHONPATH": str(ROOT), "PREFECT_API_URL": PREFECT_API_URL.value(),
                 "CARFLOW_RUNTIME__LOCK_WAIT_S": "0", "CARFLOW_CAR_FILTER__ENABLED": "false",
                 "CARFLOW_CROP__ENABLED": "false"})
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    held = [ln for ln in res.stderr.splitlines() if ln.startswith("carflow:")]  # the entry point's one line
    assert len(held) == 1 and "is held by nightly run brave-owl" in held[0] and lock_key("pipeline") in held[0]
    assert not list(open_storage(local_uri).list("listings/"))  # nothing was crawled


# ---------------------------------------------------------------------------------------
# two nightly runs at once
# ---------------------------------------------------------------------------------------
NIGHTLY_ENV = {"car_filter__enabled": "false", "crop__enabled": "false", "crawl__autothrottle": "false",
               "crawl__download_delay": "0", "runtime__lock_poll_s": "0.2"}


def test_two_nightly_runs_at_once_are_serialised(small_site, tmp_path, monkeypatch, prefect_server):
    from carflow.registry import Registry
    from carflow.settings import reset_settings
    from flows.pipeline import nightly

    for k, v in NIGHTLY_ENV.items():
        monkeypatch.setenv(f"CARFLOW_{k.upper()}", v)
    reset_settings()
    uri = str(tmp_path / "shared")
    args = {"sites": ["demo"], "storage": uri, "base_urls": {"demo": small_site.url}, "min_images": 2,
            "train": "off"}  # the lock and the manifests are the point; training is tested elsewhere
    results: list[dict] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    # make the two runs overlap, whatever the timing: the first holder keeps the lock (as
    # if its stages were still running) until the other run has come to the lock too. A
    # busy machine could otherwise start the second flow run after the first had ended.
    from carflow.lock import StorageLock

    arrivals, first_held = [], []
    both_at_lock = threading.Event()
    acquire, held = StorageLock.acquire, StorageLock._held

    def acquire_counted(self):
        arrivals.append(self.owner)
        if len(arrivals) >= 2:
            both_at_lock.set()
        return acquire(self)

    def held_until_contended(self, *a, **kw):
        out = held(self, *a, **kw)
        if not first_held:
            first_held.append(self.owner)
            assert both_at_lock.wait(300), "the second nightly never came to the lock"
        return out

    monkeypatch.setattr(StorageLock, "acquire", acquire_counted)
    monkeypatch.setattr(StorageLock, "_held", held_until_contended)

    def run() -> None:
        barrier.wait()
        try:
            results.append(nightly(**args))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert not errors, errors
    first, second = sorted(results, key=lambda r: r["lock"]["acquired_at"])
    assert first["lock"]["owner"] != second["lock"]["owner"]
    assert second["lock"]["acquired_at"] >= first["lock"]["released_at"]  # one after the other
    assert second["lock"]["waited_s"] > 0 and first["lock"]["owner"] == first_held[0]
    monkeypatch.setattr(StorageLock, "acquire", acquire)
    monkeypatch.setattr(StorageLock, "_held", held)
    store = open_storage(uri)
    assert not store.exists(lock_key("pipeline"))

    # the same chain once, uncontended, on a copy of what was crawled: the same manifests
    ref = str(tmp_path / "reference")
    ref_store = open_storage(ref)
    for key in list(store.list("raw/")) + list(store.list("listings/")) + list(store.list("crawls/")):
        ref_store.put(key, store.get(key))
    alone = nightly(**{**args, "storage": ref})
    assert alone["lock"]["took_over"] is None
    for stage in ("ingest", "clean", "dataset"):
        _assert_same_rows(_rows(uri, stage), _rows(ref, stage))
    # one dataset version, complete, and the pointer on it
    versions = Registry(store).versions("dataset")
    assert len(versions) == 1
    assert Registry(store).latest("dataset").version == versions[0].version
    reset_settings()


def test_lock_held_survives_pickling():
    """Prefect pickles a failed run's exception: the one line must come back whole."""
    import pickle

    from carflow.lock import LockRecord

    rec = LockRecord("pipeline", "h:1:ab", "nightly run x", "h", 1, 0.0, 0.0, 300.0)
    err = pickle.loads(pickle.dumps(LockHeld.of("file:///s/locks/pipeline.json", rec, 3.0)))
    assert isinstance(err, LockHeld) and "is held by nightly run x (h:1:ab)" in str(err)
