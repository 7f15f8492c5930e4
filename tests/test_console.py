"""Console output a person can read: framework banners filtered where they are made, the
missing ``gpu`` concurrency limit logged once per run, one progress line per shard."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@contextmanager
def run_log() -> Iterator[list[str]]:
    """The INFO messages of Prefect's flow run loggers while the body runs. Prefect
    configures logging when a run starts (pytest's caplog handler is replaced) and the
    tests run its loggers at WARNING (conftest): listen on the run logger itself."""
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    runs = logging.getLogger("prefect.flow_runs")
    collect, level = Collect(logging.INFO), runs.level
    runs.addHandler(collect)
    runs.setLevel(logging.INFO)
    try:
        yield messages
    finally:
        runs.removeHandler(collect)
        runs.setLevel(level)


def test_native_banners_are_dropped_and_other_native_output_kept(capfd):
    from carflow.frameworks import quiet_native_stderr

    with quiet_native_stderr():
        os.write(2, b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n")
        os.write(2, b"I0000 00:00:1.5 1 port.cc:153] oneDNN custom operations are on. You may see ...\n")
        os.write(2, b"E0000 00:00:1.6 1 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error\n")
        os.write(2, b"something else a user should see\n")
    os.write(2, b"after\n")
    err = capfd.readouterr().err
    assert err == "something else a user should see\nafter\n"


@pytest.mark.slow
def test_importing_keras_prints_no_banner(tmp_path):
    """The real thing (TensorFlow takes 20-50 s to import on a busy 2-core machine)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    proc = subprocess.run([sys.executable, "-c", "from carflow.frameworks import import_keras; import_keras()"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    for banner in ("absl::InitializeLog", "oneDNN", "cuInit", "cuda drivers"):
        assert banner not in proc.stderr, proc.stderr


def test_missing_gpu_limit_is_logged_once_and_an_existing_one_is_taken(prefect_server, caplog):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    from tasks.shards import gpu_slot

    missing = f"gpu-missing-{uuid.uuid4().hex[:6]}"
    with caplog.at_level(logging.WARNING):
        for _ in range(3):  # three shards
            with gpu_slot(missing):
                pass
    warnings = [r.getMessage() for r in caplog.records if missing in r.getMessage()]
    assert len(warnings) == 1 and "prefect gcl create" in warnings[0], warnings
    assert not [r for r in caplog.records if "do not exist" in r.getMessage()]

    present = f"gpu-{uuid.uuid4().hex[:6]}"
    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=present, limit=1))
        with gpu_slot(present):
            assert client.read_global_concurrency_limit_by_name(present).active_slots == 1
        assert client.read_global_concurrency_limit_by_name(present).active_slots == 0


def test_long_stages_log_one_line_per_shard_with_rate_and_time_left(prefect_server, tmp_path):
    from prefect import flow, task

    from carflow.storage import open_storage
    from tasks.shards import run_shards

    store = open_storage(tmp_path)

    @task(name="tiny-shard")
    def shard(ids: list[str]) -> dict:
        key = f"work/tiny/{'-'.join(ids)}.txt"
        store.put_text(key, ",".join(ids))
        return {"key": key}

    @flow
    def stage() -> list[dict]:
        results, _fresh = run_shards(shard, [["a", "b"], ["c"], ["d", "e", "f"]], lambda ids: {"ids": ids})
        return results

    with run_log() as messages:
        assert len(stage()) == 3
    lines = [m for m in messages if "shard" in m and "img/s" in m]
    assert [line.split(":")[1].split(",")[0].strip() for line in lines] == [
        "shard 1/3 done", "shard 2/3 done", "shard 3/3 done"]
    assert "6/6 images" in lines[-1] and lines[-1].endswith("0s left")


def test_a_long_folder_import_logs_one_line_per_import_task(prefect_server, tmp_path, monkeypatch):
    """The folder import goes through the same bounded submission: one line per import
    task, the last one with every file done."""
    from PIL import Image

    from carflow.settings import reset_settings
    from flows.ingest import ingest

    for i, listing in enumerate(["L1", "L2", "L3"]):
        folder = tmp_path / "src" / "ford_focus_2015"
        folder.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (32, 24), (40 * i, 90, 150)).save(folder / f"{listing}_0_x{i}.jpg", "JPEG")
    monkeypatch.setenv("CARFLOW_INGEST__SHARD_SIZE", "4")  # one listing per import task
    reset_settings()
    try:
        with run_log() as messages:
            summary = ingest(storage=str(tmp_path / "dest"), folders=str(tmp_path / "src"))
    finally:
        reset_settings()
    assert summary["images"] == 3
    lines = [m for m in messages if m.startswith("import-folder-shard: shard")]
    assert [line.split(",")[0] for line in lines] == [f"import-folder-shard: shard {n}/3 done" for n in (1, 2, 3)]
    assert "3/3 images" in lines[-1] and lines[-1].endswith("0s left")
