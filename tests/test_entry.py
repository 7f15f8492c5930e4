"""The entry points as a user meets them: ``carflow <command>`` / ``python -m flows.<name>``.

A user's mistake is one line and exit code 2 without a traceback; secrets never show up
anywhere (stdout, stderr, crawl logs, Prefect's database and logs); Prefect's temporary
server gets a generous startup timeout and sends no telemetry."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from carflow.settings import SettingsError, load_settings

ROOT = Path(__file__).resolve().parents[1]
SECRET_ID = "AKIAPLANTEDSECRET0001"
SECRET_KEY = "planted/Secret+Key0002xyz"
SECRETS = (SECRET_ID, SECRET_KEY)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CARFLOW_", "PREFECT_API_URL"))}
    env.update(PYTHONPATH=str(ROOT), **extra)
    return env


def _run(args: list[str], cwd: Path, env: dict[str, str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr[-3000:]
    lines = [x for x in proc.stderr.splitlines() if x.startswith("carflow:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# -- settings errors never hold a secret ---------------------------------------------------
def _settings_errors(monkeypatch, tmp_path) -> list[str]:
    """Trigger every settings error path with secrets planted; returns the messages."""
    monkeypatch.chdir(tmp_path)
    messages = []

    def fails(**overrides) -> None:
        with pytest.raises(SettingsError) as info:
            load_settings(**overrides)
        messages.append(str(info.value))
        messages.append(repr(info.value))
        logging.getLogger("carflow.test").error("settings failed", exc_info=info.value)

    monkeypatch.setenv("CARFLOW_STORAGE__ACCESS_KEY_ID", SECRET_ID)
    monkeypatch.setenv("CARFLOW_STORAGE__SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("CARFLOW_STORAGE__BACKEND", "s3")
    fails()  # s3 without a bucket: the error is about the whole storage section
    monkeypatch.setenv("CARFLOW_STORAGE__BUCKET", "b")
    monkeypatch.setenv("CARFLOW_STORAGE__MAX_ATTEMPTS", "0")
    fails()  # a field of the section that holds the secrets
    monkeypatch.delenv("CARFLOW_STORAGE__MAX_ATTEMPTS")
    monkeypatch.setenv("CARFLOW_RUNTIME__TASK_RUNNER", "dask")
    fails()  # another section, secrets in play
    monkeypatch.delenv("CARFLOW_RUNTIME__TASK_RUNNER")
    monkeypatch.delenv("CARFLOW_STORAGE__BUCKET")
    fails(storage={"backend": "s3", "access_key_id": SECRET_ID, "secret_access_key": SECRET_KEY})  # overrides
    fails(storage={"bucket": "b", "backend": "s3", "access_key_id": [SECRET_ID]})  # a secret of the wrong type
    monkeypatch.setenv("CARFLOW_STORAGE", f'{{"secret_access_key": "{SECRET_KEY}", ')  # not JSON
    fails()
    monkeypatch.delenv("CARFLOW_STORAGE")
    (tmp_path / "carflow.yaml").write_text(f"storage:\n  secret_access_key: {SECRET_KEY}\n")
    fails()  # a secret in the file
    (tmp_path / "carflow.yaml").write_text(f"storage:\n  bucket: b\n  endpoint_url: [{SECRET_KEY}\n")
    fails()  # invalid YAML on the line that holds a secret
    (tmp_path / "carflow.yaml").write_text(f"storage:\n  bucket: b\n  typo: {SECRET_KEY}\n")
    fails()  # an unknown key whose value is a secret
    (tmp_path / "carflow.yaml").unlink()
    monkeypatch.setenv("CARFLOW_CONFIG", str(tmp_path / "missing.yaml"))
    fails()
    return messages


def test_settings_errors_never_show_a_secret(monkeypatch, tmp_path, caplog):
    messages = _settings_errors(monkeypatch, tmp_path)
    assert len(messages) == 2 * 10
    text = "\n".join(messages) + caplog.text
    assert "storage.bucket is not set" in text and "storage.max_attempts" in text
    assert "runtime.task_runner is 'dask' but runtime.dask_address is empty" in text
    for secret in SECRETS:
        assert secret not in text


def test_cli_settings_errors_and_flow_runs_never_show_a_secret(tmp_path, demo_site):
    """The CLI (good and bad settings) and real flow runs in a fresh Prefect home with
    secrets in the environment: stdout, stderr, the crawl log and every file Prefect wrote
    (its database holds the flow and task run logs) are searched for the secrets."""
    home = tmp_path / "prefect-home"
    (tmp_path / "tmp").mkdir()
    env = _env(CARFLOW_STORAGE__ACCESS_KEY_ID=SECRET_ID, CARFLOW_STORAGE__SECRET_ACCESS_KEY=SECRET_KEY,
               PREFECT_HOME=str(home), TMPDIR=str(tmp_path / "tmp"))  # crawl logs land in tmp/
    env.pop("PREFECT_SERVER_ANALYTICS_ENABLED", None)  # carflow's entry points must turn it off
    outputs = []

    proc = _run(["-m", "flows.cli", "settings"], tmp_path, {**env, "CARFLOW_STORAGE__BACKEND": "s3",
                                                            "CARFLOW_STORAGE__BUCKET": "b"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert '"secret_access_key": "**********"' in proc.stdout
    outputs += [proc.stdout, proc.stderr]
    for args in (["-m", "flows.cli", "settings"], ["-m", "flows.clean"]):
        proc = _run(args, tmp_path, {**env, "CARFLOW_STORAGE__BACKEND": "s3"})
        _assert_one_line_error(proc, "storage.bucket is not set")
        outputs += [proc.stdout, proc.stderr]

    # flow runs on Prefect's temporary server: ingest through its entry point, a crawl,
    # and a flow that meets bad settings inside its run
    script = textwrap.dedent(f"""
        import os, sys
        from flows.entry import prefect_defaults, prepare_process
        from flows import crawl, ingest
        assert ingest.main(["--storage", "store"]) == 0
        assert crawl.main(["demo", "--base-url", {demo_site.url!r}, "--storage", "store", "--max-listings", "2"]) == 0
        from carflow.settings import SettingsError, reset_settings
        os.environ["CARFLOW_STORAGE__BACKEND"] = "s3"
        reset_settings()
        prepare_process()
        with prefect_defaults():
            try:
                ingest.ingest()
            except SettingsError as exc:
                print("flow failed as expected:", exc)
            else:
                sys.exit("the flow should have failed")
        """)
    proc = _run(["-c", script], tmp_path, env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert "flow failed as expected" in proc.stdout
    assert "telemetry" not in proc.stderr.lower(), proc.stderr[-3000:]
    outputs += [proc.stdout, proc.stderr]

    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.suffix == ".db" for p in files), files  # Prefect's database: run logs, states, artifacts
    assert any(p.name.startswith("carflow-crawl-") and p.suffix == ".log" for p in files), files
    for secret in SECRETS:
        for text in outputs:
            assert secret not in text
        for path in files:
            assert secret.encode() not in path.read_bytes(), path


# -- user errors ------------------------------------------------------------------------
def test_missing_input_manifest_is_one_line_naming_the_command(tmp_path, prefect_server):
    """Inside a flow run (on the test server): Prefect logs the failure without a
    traceback on the console, the entry point prints one line and exits 2."""
    from prefect.settings import PREFECT_API_URL

    env = _env(PREFECT_API_URL=PREFECT_API_URL.value())
    proc = _run(["-m", "flows.clean", "--storage", "empty"], tmp_path, env)
    line = _assert_one_line_error(proc, "manifests/ingest/manifest.parquet does not exist", "run `carflow ingest` first")
    assert str(tmp_path / "empty") in line


def test_missing_manifest_error_is_a_key_error_and_names_the_stage(tmp_path):
    from carflow.errors import UserError
    from carflow.manifest import ManifestMissing, read_manifest
    from carflow.storage import open_storage

    store = open_storage(tmp_path)
    with pytest.raises(ManifestMissing) as info:
        read_manifest(store, "manifests/car_filter/manifest.parquet")
    assert isinstance(info.value, KeyError) and isinstance(info.value, UserError)
    assert str(info.value) == (f"manifests/car_filter/manifest.parquet does not exist in {store.uri()}: "
                               "run `carflow car-filter score` first")


def test_ingest_of_a_folder_that_does_not_exist_is_one_line(tmp_path):
    proc = _run(["-m", "flows.cli", "ingest", str(tmp_path / "typo"), "--layout", "folders"], tmp_path, _env())
    _assert_one_line_error(proc, str(tmp_path / "typo"), "does not exist", "--layout folders")


def test_ingest_flow_refuses_a_folder_without_images(tmp_path, prefect_server):
    from carflow.errors import UserError
    from flows.ingest import ingest

    (tmp_path / "src" / "ford_focus").mkdir(parents=True)
    (tmp_path / "src" / "ford_focus" / "readme.txt").write_text("no photos")
    with pytest.raises(UserError, match="no image files"):
        ingest(storage=str(tmp_path / "dest"), folders=str(tmp_path / "src"))


# -- Prefect's temporary server ---------------------------------------------------------------
@pytest.mark.parametrize(("user_value", "expected"), [(None, "180"), ("77", "77")])
def test_entry_points_give_prefect_a_generous_startup_timeout(tmp_path, user_value, expected):
    env = _env(PREFECT_HOME=str(tmp_path / "home"))
    env.pop("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", None)
    env.pop("PREFECT_SERVER_ANALYTICS_ENABLED", None)
    if user_value:
        env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = user_value
    script = textwrap.dedent("""
        import os
        import prefect  # imported first, as every flow module does
        from prefect.settings import PREFECT_SERVER_ANALYTICS_ENABLED, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS
        from flows.entry import entry_point

        @entry_point
        def main(argv):
            print(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value(), PREFECT_SERVER_ANALYTICS_ENABLED.value(),
                  os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"], os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"])
            return 0

        raise SystemExit(main([]))
        """)
    proc = _run(["-c", script], tmp_path, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == [expected, "False", expected, "false"]


def test_prefect_notice_about_thread_task_timeouts_is_dropped(prefect_server):
    """Every shard task has a timeout (``RETRY.io()``) and runs in a worker thread; Prefect's
    warning that such a timeout cannot interrupt a blocking call (once per shard) is
    dropped, other task-run warnings are not."""
    from prefect import flow, get_run_logger, task
    from prefect.task_runners import ThreadPoolTaskRunner

    import flows  # noqa: F401 - installs the filter, as every flow module does

    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    @task(timeout_seconds=60)
    def shard(i: int) -> int:
        get_run_logger().warning("shard %d says hello", i)
        return i

    @flow(task_runner=ThreadPoolTaskRunner(max_workers=2))
    def stage() -> list[int]:
        return [f.result() for f in [shard.submit(i) for i in range(3)]]

    handler = Keep(level=logging.DEBUG)
    logger = logging.getLogger("prefect.task_runs")
    logger.addHandler(handler)
    try:
        assert stage() == [0, 1, 2]
    finally:
        logger.removeHandler(handler)
    messages = [r.getMessage() for r in records]
    assert sum("says hello" in m for m in messages) == 3  # the handler sees this logger's warnings
    assert not any("running in a worker thread" in m for m in messages)
