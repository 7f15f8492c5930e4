"""Scale-out and retries: the task runner is a setting (thread, process, local, dask),
the clean stage on a real 2-worker Dask cluster gives the same manifest as a local run,
and the one retry policy retries transient failures and stops on bad input."""

from __future__ import annotations

import io
import sys

import pyarrow.parquet as pq
import pytest
from prefect import flow, task
from prefect.task_runners import ProcessPoolTaskRunner, ThreadPoolTaskRunner

from carflow.errors import UserError
from carflow.manifest import manifest_key, to_pandas
from carflow.settings import RuntimeSettings, Settings, SettingsError, load_settings
from carflow.storage import open_storage
from tasks.retry import RETRY, RetryPolicy, with_retry_policy
from tasks.runners import SettingsTaskRunner, task_runner


def test_runner_follows_the_setting(prefect_server):
    assert isinstance(task_runner("io", RuntimeSettings(task_runner="thread")), ThreadPoolTaskRunner)
    assert isinstance(task_runner("cpu", RuntimeSettings(task_runner="process")), ProcessPoolTaskRunner)
    local = RuntimeSettings(task_runner="local", max_workers=3)
    assert isinstance(task_runner("io", local), ThreadPoolTaskRunner)
    cpu = task_runner("cpu", Settings(runtime=local))
    assert isinstance(cpu, ProcessPoolTaskRunner) and cpu._max_workers == 3
    from prefect_dask import DaskTaskRunner

    dask = task_runner("cpu", RuntimeSettings(task_runner="dask", dask_address="tcp://127.0.0.1:8786"))
    assert isinstance(dask, DaskTaskRunner) and dask.address == "tcp://127.0.0.1:8786"
    # at decoration nothing is read; a run's duplicate() reads the settings then
    assert isinstance(task_runner("cpu"), SettingsTaskRunner)


def test_an_unsupported_runner_names_the_setting(monkeypatch):
    monkeypatch.setenv("CARFLOW_RUNTIME__TASK_RUNNER", "ray")
    with pytest.raises(SettingsError, match="runtime.task_runner"):
        load_settings()
    monkeypatch.setenv("CARFLOW_RUNTIME__TASK_RUNNER", "dask")
    with pytest.raises(SettingsError, match="runtime.dask_address"):
        load_settings()
    monkeypatch.setenv("CARFLOW_RUNTIME__DASK_ADDRESS", "tcp://10.0.0.5:8786")
    assert load_settings().runtime.dask_address == "tcp://10.0.0.5:8786"


def test_the_flow_runner_is_chosen_when_the_run_starts(monkeypatch, prefect_server):
    from carflow.settings import reset_settings

    monkeypatch.setenv("CARFLOW_RUNTIME__TASK_RUNNER", "local")
    reset_settings()
    try:
        assert isinstance(SettingsTaskRunner("cpu").duplicate(), ProcessPoolTaskRunner)
        assert isinstance(SettingsTaskRunner("io").duplicate(), ThreadPoolTaskRunner)
    finally:
        monkeypatch.delenv("CARFLOW_RUNTIME__TASK_RUNNER")
        reset_settings()


def test_worker_runners_need_a_reachable_api():
    """Process and Dask workers report to the Prefect API: with only an ephemeral one
    (no PREFECT_API_URL), the runner refuses with one line naming what to set."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        assert isinstance(task_runner("io", RuntimeSettings(task_runner="local")), ThreadPoolTaskRunner)
        with pytest.raises(UserError, match="PREFECT_API_URL"):
            task_runner("cpu", RuntimeSettings(task_runner="process"))


# --- retries ---------------------------------------------------------------------------

ATTEMPTS: list[str] = []


@task(**RETRY.io())
def flaky(kind: str, fail_times: int) -> str:
    ATTEMPTS.append(kind)
    if len(ATTEMPTS) <= fail_times:
        if kind == "transient":
            raise ConnectionError("endpoint went away")
        if kind == "value":
            raise ValueError("bad input: not a manifest")
        raise UserError("no manifests/ingest/manifest.parquet: run `carflow ingest` first")
    return "ok"


def test_policy_has_backoff_jitter_and_timeout():
    opts = RetryPolicy(retries=3, backoff_s=2.0, jitter=0.5, timeout_s=60).io()
    t = flaky.with_options(**opts)
    assert t.retries == 3 and t.retry_delay_seconds == [2.0, 4.0, 8.0]
    assert t.retry_jitter_factor == 0.5 and t.timeout_seconds == 60
    fast = with_retry_policy(flaky, RuntimeSettings(retries=5, retry_backoff_s=0.01))
    assert fast.retries == 5 and fast.retry_delay_seconds == [0.01, 0.02, 0.04, 0.08, 0.16]


@pytest.mark.parametrize(("kind", "attempts", "final"), [
    ("transient", 3, "Completed"),  # failed twice, retried, succeeded
    ("value", 1, "Failed"),  # bad input: never retried
    ("user", 1, "Failed"),
])
def test_transient_errors_are_retried_bad_input_is_not(prefect_server, kind, attempts, final):
    fast = with_retry_policy(flaky, RuntimeSettings(retries=3, retry_backoff_s=0.01, retry_jitter=0.1))

    @flow
    def run() -> str:
        return fast(kind, fail_times=2, return_state=True).type.value

    ATTEMPTS.clear()
    assert run().title() == final
    assert len(ATTEMPTS) == attempts


# --- scale-out on Dask ------------------------------------------------------------------

COMPARED = ["listing_id", "photo_index", "image_id", "source_id", "status", "reason", "width", "height",
            "fix_actions", "quality_flags", "phash", "dhash", "pixel_hash", "dup_of", "is_representative"]


def _manifest(uri: str):
    df = to_pandas(pq.read_table(io.BytesIO(open_storage(uri).get(manifest_key("clean")))))
    df = df.sort_values(["listing_id", "photo_index"], kind="stable").reset_index(drop=True)
    return df[[c for c in COMPARED if c in df.columns]]


@pytest.mark.integration
def test_clean_on_a_dask_cluster_gives_the_local_manifest(tmp_path, prefect_server):
    from distributed import Client, LocalCluster

    from demo.bulk import write_bulk_ingest
    from flows.clean import clean

    local, remote = str(tmp_path / "local"), str(tmp_path / "dask")
    ids_local = write_bulk_ingest(open_storage(local), 120, bodies=6, broken_every=10)
    ids_remote = write_bulk_ingest(open_storage(remote), 120, bodies=6, broken_every=10)
    assert ids_local == ids_remote

    local_summary = clean.with_options(task_runner=task_runner("cpu", RuntimeSettings()))(storage=local, shard_size=40)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        runtime = RuntimeSettings(task_runner="dask", dask_address=cluster.scheduler_address)
        dask_summary = clean.with_options(task_runner=task_runner("cpu", runtime))(storage=remote, shard_size=40)
        with Client(cluster) as client:  # the shards really ran in the workers' processes
            ran = client.run(lambda: "tasks.clean" in sys.modules)
    assert any(ran.values()), ran

    assert dask_summary["shards"] == local_summary["shards"] == 3
    assert dask_summary["inspected_images"] == local_summary["inspected_images"] > 0
    assert dask_summary["dropped_by_reason"] == local_summary["dropped_by_reason"]
    a, b = _manifest(local), _manifest(remote)
    assert len(a) == len(b) == 120
    assert a.equals(b), a.compare(b)
    assert {"empty", "not_image", "truncated"} & set(a["reason"].dropna())
