"""The deployment files hang together: compose services, Dockerfile, prefect.yaml entrypoints."""

from __future__ import annotations

import importlib
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _compose_cli_works() -> bool:
    if not shutil.which("docker"):
        return False
    return subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0


def test_compose_config():
    path = ROOT / "docker-compose.yml"
    if _compose_cli_works():
        proc = subprocess.run(["docker", "compose", "-f", str(path), "config", "-q"], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
    doc = yaml.safe_load(path.read_text())
    services = doc["services"]
    assert {"postgres", "prefect-server", "minio", "create-bucket", "worker"} <= set(services)
    db_url = services["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert db_url.startswith("postgresql+asyncpg://") and "@postgres:5432/" in db_url
    assert services["prefect-server"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["create-bucket"]["depends_on"]["minio"]["condition"] == "service_healthy"
    assert "mc mb" in " ".join(services["create-bucket"]["command"])
    worker = services["worker"]
    assert (ROOT / worker["build"]["context"] / worker["build"]["dockerfile"]).is_file()
    assert worker["environment"]["CARFLOW_STORAGE__BACKEND"] == "s3"
    assert worker["environment"]["CARFLOW_STORAGE__ENDPOINT_URL"] == "http://minio:9000"
    assert worker["depends_on"]["create-bucket"]["condition"] == "service_completed_successfully"
    gpu = services["worker-gpu"]
    assert gpu["profiles"] == ["gpu"] and "--pool" in gpu["command"] and "gpu" in gpu["command"]
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"
    assert gpu["environment"] == worker["environment"]
    assert "setup-prefect.sh" in services["prefect-setup"]["command"][0]
    assert "deploy --prefect-file infra/prefect.yaml --all" in services["prefect-setup"]["command"][0]
    assert services["dask-worker"]["command"][:3] == ["dask", "worker", "tcp://dask-scheduler:8786"]
    for name, svc in services.items():
        assert "image" in svc or "build" in svc, name
        for dep in svc.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown service {dep}"
    for vol in (v.split(":")[0] for s in services.values() for v in s.get("volumes", [])):
        assert vol in doc["volumes"]


def test_dockerfile_copies_existing_files():
    text = (ROOT / "infra" / "Dockerfile").read_text()
    for line in text.splitlines():
        if line.startswith("COPY ") and not line.startswith("COPY . "):
            for src in line.split()[1:-1]:
                assert (ROOT / src).exists(), f"Dockerfile copies missing {src}"


def test_prefect_yaml_entrypoints_resolve():
    doc = yaml.safe_load((ROOT / "infra" / "prefect.yaml").read_text())
    assert doc["deployments"]
    for dep in doc["deployments"]:
        path, func = dep["entrypoint"].split(":")
        module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
        flow = getattr(module, func)
        assert hasattr(flow, "fn") and hasattr(flow, "deploy"), f"{dep['entrypoint']} is not a Prefect flow"
        params = set(dep.get("parameters", {}))
        assert params <= set(flow.parameters.properties), f"{dep['name']}: unknown parameters {params}"
    crons = [s["cron"] for d in doc["deployments"] for s in d.get("schedules", [])]
    assert crons, "at least one scheduled deployment"


@pytest.mark.parametrize("script", [".ci/run"])
def test_ci_runs_make_test(script):
    assert "make test" in (ROOT / script).read_text()
