"""The deployments start for real: `prefect server start` on a loopback port with its own
PREFECT_HOME, infra/setup-prefect.sh (pools + the gpu limit), `prefect deploy --all` from
infra/prefect.yaml, a process worker, one deployment triggered through the API and run to
completion, and its artifacts read back through the API."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from tests.conftest import ROOT, free_port

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent


def _api(base: str, method: str, path: str, body: dict | None = None):
    req = urllib.request.Request(base + path, method=method, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read() or b"null")


def _folder_dataset(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for cls, colour in (("ford_ranger_2017", (200, 40, 40)), ("bmw_3-series_2015", (40, 40, 200))):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            arr = np.clip(np.array(colour) + rng.normal(0, 20, (96, 128, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(root / cls / f"{100 + i}_1_{cls}-{i}.jpg", quality=90)
    return root


@pytest.fixture(scope="module")
def live_server(tmp_path_factory):
    home = tmp_path_factory.mktemp("prefect-live-home")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_LOGGING_LEVEL="WARNING",
               PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")
    server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    base = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + 120
    while True:
        try:
            _api(base, "GET", "/health")
            break
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                pytest.fail("prefect server start did not come up in 120 s")
            time.sleep(0.5)
    env["PREFECT_API_URL"] = base
    try:
        yield base, env
    finally:
        server.terminate()
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()


def test_deploy_all_then_a_worker_runs_a_deployment(live_server, tmp_path):
    base, env = live_server
    run = dict(env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    setup = subprocess.run(["bash", "infra/setup-prefect.sh"], **run)
    assert setup.returncode == 0, setup.stderr
    again = subprocess.run(["bash", "infra/setup-prefect.sh"], **run)  # idempotent
    assert again.returncode == 0, again.stderr
    pools = {p["name"]: p["type"] for p in _api(base, "POST", "/work_pools/filter", {})}
    assert pools.get("cpu") == "process" and pools.get("gpu") == "process"
    limit = _api(base, "GET", "/v2/concurrency_limits/gpu")
    assert limit["limit"] >= 1

    deploy = subprocess.run([str(BIN / "prefect"), "--no-prompt", "deploy", "--prefect-file", "infra/prefect.yaml",
                             "--all"], **run)
    assert deploy.returncode == 0, deploy.stdout[-3000:] + deploy.stderr[-3000:]
    declared = yaml.safe_load((ROOT / "infra" / "prefect.yaml").read_text())["deployments"]
    deployments = _api(base, "POST", "/deployments/filter", {})
    assert {d["name"] for d in deployments} == {d["name"] for d in declared}
    for d in deployments:  # the rendered pull step: the repo root, which exists
        steps = d["pull_steps"]
        assert steps and steps[0]["prefect.deployments.steps.set_working_directory"]["directory"] == str(ROOT)
    by_name = {d["name"]: d for d in deployments}
    assert by_name["nightly"]["schedules"] and by_name["nightly"]["work_pool_name"] == "cpu"
    assert by_name["crop"]["work_pool_name"] == "gpu"

    data = _folder_dataset(tmp_path / "seed")
    storage = tmp_path / "storage"
    flow_run = _api(base, "POST", f"/deployments/{by_name['ingest']['id']}/create_flow_run",
                    {"parameters": {"params": {"storage": str(storage), "folders": str(data), "site": "seed"}}})
    wenv = dict(env, PREFECT_WORKER_QUERY_SECONDS="1", PREFECT_WORKER_PREFETCH_SECONDS="5")
    worker = subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", "cpu", "--type", "process",
                               "--run-once"], env=wenv, cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        state = None
        while time.monotonic() < deadline:
            state = _api(base, "GET", f"/flow_runs/{flow_run['id']}")["state"]
            if state and state["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                break
            time.sleep(1)
    finally:
        if worker.poll() is None:
            worker.terminate()
        out = worker.communicate(timeout=30)[0]
    assert state and state["type"] == "COMPLETED", f"{state}\n{out[-4000:]}"
    artifacts = _api(base, "POST", "/artifacts/filter",
                     {"artifacts": {"flow_run_id": {"any_": [flow_run["id"]]}}})
    keys = {a["key"] for a in artifacts}
    assert {"ingest-counts", "ingest-manifest"} <= keys
    counts = next(a for a in artifacts if a["key"] == "ingest-counts")["data"]
    rows = {r["count"]: r["value"] for r in (json.loads(counts) if isinstance(counts, str) else counts)}
    assert rows["rows"] == 6 and rows["images"] == 6
    assert (storage / "manifests" / "ingest" / "manifest.parquet").is_file()
