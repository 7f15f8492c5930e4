"""Settings: sources, priorities, clear errors naming the setting, secrets from env only."""

from __future__ import annotations

import logging

import pytest

from carflow.settings import SettingsError, load_settings
from carflow.storage import S3Storage, open_storage


def test_defaults_are_local_storage(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    s = load_settings()
    assert s.storage.backend == "local"
    assert s.crawl.obey_robots is True
    assert s.car_filter.threshold == 0.7
    assert (s.split.train, s.split.val, s.split.test) == (0.70, 0.15, 0.15)


def test_env_overrides_yaml(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "carflow.yaml").write_text("crawl:\n  user_agent: from-yaml\n  concurrent_requests: 7\n")
    s = load_settings()
    assert s.crawl.user_agent == "from-yaml" and s.crawl.concurrent_requests == 7
    monkeypatch.setenv("CARFLOW_CRAWL__USER_AGENT", "from-env")
    s = load_settings()
    assert s.crawl.user_agent == "from-env" and s.crawl.concurrent_requests == 7


def test_config_path_from_env(monkeypatch, tmp_path):
    cfg = tmp_path / "other.yaml"
    cfg.write_text("dedup:\n  hamming_radius: 5\n")
    monkeypatch.setenv("CARFLOW_CONFIG", str(cfg))
    assert load_settings().dedup.hamming_radius == 5
    monkeypatch.setenv("CARFLOW_CONFIG", str(tmp_path / "missing.yaml"))
    with pytest.raises(SettingsError, match="CARFLOW_CONFIG"):
        load_settings()


@pytest.mark.parametrize(
    ("env", "value", "named"),
    [
        ("CARFLOW_STORAGE__BACKEND", "ftp", "storage.backend"),
        ("CARFLOW_CAR_FILTER__THRESHOLD", "1.5", "car_filter.threshold"),
        ("CARFLOW_CRAWL__CONCURRENT_REQUESTS", "many", "crawl.concurrent_requests"),
    ],
)
def test_invalid_values_name_the_setting(monkeypatch, tmp_path, env, value, named):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(env, value)
    with pytest.raises(SettingsError) as info:
        load_settings()
    assert named in str(info.value)
    assert env in str(info.value)


def test_cross_field_validation(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SettingsError, match="split"):
        load_settings(split={"train": 0.8, "val": 0.15, "test": 0.15})
    with pytest.raises(SettingsError, match="storage.bucket"):
        load_settings(storage={"backend": "s3"})


def test_unknown_yaml_key_is_an_error(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "carflow.yaml").write_text("crawl:\n  usr_agent: typo\n")
    with pytest.raises(SettingsError, match="crawl.usr_agent"):
        load_settings()


def test_secrets_only_from_env_and_never_shown(monkeypatch, tmp_path, caplog):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "carflow.yaml").write_text("storage:\n  secret_access_key: hunter2\n")
    with pytest.raises(SettingsError, match="only read from the environment") as info:
        load_settings()
    assert "hunter2" not in str(info.value)
    (tmp_path / "carflow.yaml").unlink()

    monkeypatch.setenv("CARFLOW_STORAGE__BACKEND", "s3")
    monkeypatch.setenv("CARFLOW_STORAGE__BUCKET", "b")
    monkeypatch.setenv("CARFLOW_STORAGE__ACCESS_KEY_ID", "AKIDSECRET1")
    monkeypatch.setenv("CARFLOW_STORAGE__SECRET_ACCESS_KEY", "topsecret2")
    s = load_settings()
    assert s.storage.secret_access_key.get_secret_value() == "topsecret2"
    shown = repr(s) + str(s.public_dict()) + repr(open_storage(s.storage))
    logging.getLogger("t").warning("settings: %s", s)
    for secret in ("AKIDSECRET1", "topsecret2"):
        assert secret not in shown
        assert secret not in caplog.text
    store = open_storage(s.storage)
    assert isinstance(store, S3Storage)
    creds = store.client._request_signer._credentials
    assert creds.access_key == "AKIDSECRET1"


def test_settings_that_do_nothing_are_refused(monkeypatch, tmp_path):
    """Every runner carflow has (tasks/runners.py) loads; a runner it does not have, or
    ``dask`` with no scheduler to reach, is refused with the setting and its variable."""
    monkeypatch.chdir(tmp_path)
    assert load_settings().runtime.task_runner == "thread"
    for runner in ("thread", "process", "local"):
        monkeypatch.setenv("CARFLOW_RUNTIME__TASK_RUNNER", runner)
        assert load_settings().runtime.task_runner == runner
    monkeypatch.setenv("CARFLOW_RUNTIME__TASK_RUNNER", "ray")
    with pytest.raises(SettingsError, match=r"runtime\.task_runner \[CARFLOW_RUNTIME__TASK_RUNNER\].*'dask'.*'ray'"):
        load_settings()
    monkeypatch.setenv("CARFLOW_RUNTIME__TASK_RUNNER", "dask")
    with pytest.raises(SettingsError, match=r"runtime\.dask_address is empty.*CARFLOW_RUNTIME__DASK_ADDRESS="):
        load_settings()
    monkeypatch.setenv("CARFLOW_RUNTIME__DASK_ADDRESS", "tcp://scheduler:8786")
    assert load_settings().runtime.dask_address == "tcp://scheduler:8786"


def test_section_errors_mask_the_secrets_of_the_section(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CARFLOW_STORAGE__BACKEND", "s3")
    monkeypatch.setenv("CARFLOW_STORAGE__ACCESS_KEY_ID", "AKIDSECRET9")
    monkeypatch.setenv("CARFLOW_STORAGE__SECRET_ACCESS_KEY", "topsecret9")
    with pytest.raises(SettingsError) as info:
        load_settings()
    text = str(info.value)
    assert "storage.bucket is not set" in text and "'access_key_id': '**********'" in text
    assert "AKIDSECRET9" not in text and "topsecret9" not in text and "\n" not in text
