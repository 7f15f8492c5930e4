"""The registry (carflow.registry) on both storage backends: put → meta.json last,
pointers, resolve of every spec form, champion/challenger promotion."""

from __future__ import annotations

import json

import pytest

from carflow import keys
from carflow.registry import Registry, RegistryError, metric_at_least
from carflow.storage import local_file, open_storage


def test_put_resolve_promote_round_trip(storage_uri):
    reg = Registry(storage_uri)
    with pytest.raises(RegistryError, match="carflow train"):
        reg.resolve("classifier")
    v1 = reg.put_version("classifier", {"model.keras": b"one", "labels.json": '["a", "b"]'},
                         {"metrics": {"top1": 0.5}}, version="v1")
    assert v1.meta["files"] == ["labels.json", "model.keras"] and v1.main == "model.keras"
    assert reg.latest("classifier") is None  # writing a version never moves the pointer
    assert reg.promote("classifier", "v1", metric_at_least("top1")).promoted
    reg.put_version("classifier", {"model.keras": b"two"}, {"metrics": {"top1": 0.4}}, version="v2")
    d = reg.promote("classifier", "v2", metric_at_least("top1"))
    assert not d.promoted and (d.candidate_value, d.incumbent_value) == (0.4, 0.5)
    assert reg.resolve("classifier").version == "v1"
    # the decision is recorded with both numbers
    rec = json.loads(open_storage(storage_uri).get(keys.version_key("classifier", "v2", "promotion.json")))
    assert rec["promoted"] is False and rec["incumbent"] == "v1"
    assert reg.promote("classifier", "v2", "always").promoted
    assert reg.resolve("classifier", "latest").version == "v2"
    assert reg.resolve("classifier", "v1").get("model.keras") == b"one"
    assert [v.version for v in reg.versions("classifier")] == ["v1", "v2"]
    # a URI (or path) of a version folder, and of one file in it
    folder = open_storage(storage_uri).uri(keys.version_key("classifier", "v1"))
    assert reg.resolve("classifier", folder).meta["metrics"]["top1"] == 0.5
    one = reg.resolve("classifier", folder + "/labels.json")
    assert one.main == "labels.json" and json.loads(one.local_path().read_text()) == ["a", "b"]
    assert local_file(folder + "/model.keras").read_bytes() == b"one"


def test_half_written_version_is_invisible(storage_uri):
    reg = Registry(storage_uri)
    store = open_storage(storage_uri)
    store.put(keys.version_key("detector", "partial", "weights.pt"), b"w")  # no meta.json yet
    assert reg.versions("detector") == []
    with pytest.raises(RegistryError, match="does not exist"):
        reg.resolve("detector", "partial")
    with pytest.raises(RegistryError, match="does not exist"):
        reg.promote("detector", "partial")
    assert not store.exists(keys.pointer_key("detector"))


def test_missing_locations_name_the_setting(tmp_path):
    reg = Registry(str(tmp_path))
    with pytest.raises(RegistryError, match="classifier.model"):
        reg.resolve("classifier", str(tmp_path / "nope" / "model.keras"), setting="classifier.model")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        local_file(str(tmp_path / "missing.pt"))


def test_a_pointer_left_by_an_earlier_carflow_gives_a_clear_error(tmp_path):
    """Versions written before the registry (config.json, `{version, model}` pointers) are
    not migrated; resolving one says so and names the command that makes a new one."""
    import json

    from carflow.registry import Registry, RegistryError
    from carflow.storage import LocalStorage

    store = LocalStorage(tmp_path)
    store.put("models/car_filter/old1/model.keras", b"x")
    store.put("models/car_filter/old1/config.json", b"{}")
    store.put("models/car_filter/latest.json", json.dumps({"version": "old1", "model": "x"}).encode())
    with pytest.raises(RegistryError, match=r"old1.*no meta.json.*before the registry.*carflow car-filter train"):
        Registry(store).resolve("car_filter", "latest", setting="car_filter.model")
