"""Every flow takes one pydantic parameter model (``flows/params.py``): the schema Prefect
stores for a deployment is typed and described field by field, a bad value from the UI
is refused naming the field, the command line's flags come from the same model (a bad
flag is one line naming it, exit 2), and ``refresh`` recomputes a stage's stored shards."""

from __future__ import annotations

import importlib
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]

#: every stage flow (entrypoint in infra/prefect.yaml) → a bad value for one of its fields
STAGE_FLOWS = {
    "flows/crawl.py:crawl": ("max_listings", "many"),
    "flows/ingest.py:ingest": ("sites", "demo"),
    "flows/clean.py:clean": ("shard_size", "many"),
    "flows/car_filter.py:labelling_kit": ("n", 0),
    "flows/car_filter.py:train": ("epochs", "ten"),
    "flows/car_filter.py:score": ("threshold", 1.5),
    "flows/crop.py:crop": ("conf", "high"),
    "flows/crop.py:train_detector": ("force", "maybe"),
    "flows/dataset.py:dataset": ("conflict_policy", "coin-flip"),
    "flows/evaluate.py:evaluate": ("promote", "perhaps"),
    "flows/train.py:train": ("backbone", "vgg"),
}


def _flow(entrypoint: str):
    path, name = entrypoint.split(":")
    return getattr(importlib.import_module(path.removesuffix(".py").replace("/", ".")), name)


def _typed(prop: dict, defs: dict) -> bool:
    """A JSON schema property with a real type: no bare ``{}`` (Any) and no object
    without a typed value schema."""
    if "$ref" in prop:
        return True
    if "anyOf" in prop:
        return all(_typed(p, defs) for p in prop["anyOf"])
    if "enum" in prop or "const" in prop:
        return True
    kind = prop.get("type")
    if kind == "object":
        values = prop.get("additionalProperties")
        return isinstance(values, dict) and _typed(values, defs) or bool(prop.get("properties"))
    if kind == "array":
        return _typed(prop.get("items", {}), defs)
    return kind in ("string", "integer", "number", "boolean", "null")


def test_every_stage_deployment_is_in_the_list():
    declared = {d["entrypoint"] for d in yaml.safe_load((ROOT / "infra" / "prefect.yaml").read_text())["deployments"]}
    # nightly and demo are the composed flows (flows/pipeline.py, flows/demo.py)
    assert declared - {"flows/pipeline.py:nightly", "flows/demo.py:demo"} == set(STAGE_FLOWS)


@pytest.mark.parametrize("entrypoint", sorted(STAGE_FLOWS))
def test_deployment_schema_is_one_typed_described_model(entrypoint):
    """What `prefect deploy` stores as the deployment's parameter_openapi_schema."""
    from prefect.utilities.callables import parameter_schema

    flow = _flow(entrypoint)
    schema = parameter_schema(flow.fn).model_dump()
    assert schema == flow.parameters.model_dump()
    props, defs = schema["properties"], schema["definitions"]
    assert props["params"]["$ref"].startswith("#/definitions/")
    assert set(props) - {"params"} <= {"argv"}  # train also records its command line
    model = defs[props["params"]["$ref"].rsplit("/", 1)[-1]]
    assert model["additionalProperties"] is False  # an unknown field is refused
    assert len(model["properties"]) >= 3
    for name, prop in model["properties"].items():
        assert prop.get("description"), f"{entrypoint}: {name} has no description"
        assert _typed(prop, defs), f"{entrypoint}: {name} is untyped: {prop}"
    for name, prop in props.items():
        assert _typed(prop, defs), f"{entrypoint}: parameter {name} is untyped"


@pytest.mark.parametrize("entrypoint", sorted(STAGE_FLOWS))
def test_a_bad_value_from_the_ui_names_the_field(entrypoint):
    """Prefect validates the run's parameters (as sent by the UI) before the flow starts."""
    from prefect.exceptions import ParameterTypeError

    flow = _flow(entrypoint)
    field, bad = STAGE_FLOWS[entrypoint]
    required = {"labels": "labels.csv", "data": "data.yaml"}
    given = {k: v for k, v in required.items() if k in flow.params_model.model_fields}
    ok = flow.validate_parameters({"params": given})
    assert isinstance(ok["params"], flow.params_model)
    with pytest.raises(ParameterTypeError, match=rf"params\.{field}\b"):
        flow.validate_parameters({"params": {**given, field: bad}})
    with pytest.raises(ParameterTypeError, match=r"params\.no_such_field"):
        flow.validate_parameters({"params": {**given, "no_such_field": 1}})


def test_a_bad_value_fails_the_run_naming_the_field(prefect_server):
    """Called from Python with the model's fields as keywords (as the pipeline does) or
    as ``params``: the same validation, on a real flow run."""
    from prefect.exceptions import ParameterTypeError

    from flows.clean import clean

    with pytest.raises(ParameterTypeError, match=r"params\.shard_size"):
        clean(shard_size="many")
    with pytest.raises(ParameterTypeError, match=r"params\.shard_size"):
        clean(params={"shard_size": 0})


# -- the command line ---------------------------------------------------------------------
#: flags the README, the tests and the docs use, per module: each must still parse
OLD_FLAGS = {
    "crawl": [["demo", "--base-url", "http://x", "--storage", "s", "--jobdir", "j", "--crawl-id", "c",
               "--max-listings", "2"]],
    "ingest": [["p", "--layout", "folders", "--storage", "s", "--site", "a", "--site", "b", "--import-site", "seed"],
               ["--folders", "f"]],
    "clean": [["--storage", "s", "--shard-size", "40"]],
    "car_filter": [["--storage", "s", "kit", "--n", "5", "--out", "o", "--seed", "1"],
                   ["train", "--labels", "l.csv", "--epochs", "2", "--weights", "none", "--image-size", "64",
                    "--alpha", "0.35", "--batch-size", "8", "--patience", "1"],
                   ["score", "--model", "latest", "--shard-size", "3", "--threshold", "0.5", "--storage", "s"]],
    "crop": [["--storage", "s", "--shard-size", "3", "--source", "clean", "--weights", "latest", "--imgsz", "320",
              "--conf", "0.3"],
             ["--storage", "s", "train", "--data", "d.yaml", "--epochs", "1", "--imgsz", "64", "--batch", "2",
              "--model", "yolov5nu.yaml", "--device", "cpu", "--force"]],
    "dataset": [["--storage", "s", "--min-images", "2", "--merge-map", "m.yaml", "--ignore", "a", "b",
                 "--conflict-policy", "drop", "--export", "e", "--tfrecord", "--tfrecord-size", "64", "--source", "crop"],
                ["--tfrecord", "t", "--gc-exports"]],
    "evaluate": [["--storage", "s", "--model", "latest", "--dataset", "latest", "--promote", "--force",
                  "--no-calibrate"]],
    "train": [["--storage", "s", "--epochs", "3", "--backbone", "mobilenetv2", "--weights", "none", "--no-evaluate"]],
}


@pytest.mark.parametrize("module", sorted(OLD_FLAGS))
def test_existing_flags_still_parse_into_the_model(module):
    mod = importlib.import_module(f"flows.{module}")
    for argv in OLD_FLAGS[module]:
        assert mod.parser().parse_args(argv) is not None, argv


def test_flags_land_in_the_model():
    from flows.car_filter import ScoreParams
    from flows.car_filter import parser as car_filter_parser
    from flows.crop import CropParams, DetectorTrainParams
    from flows.crop import parser as crop_parser
    from flows.dataset import DatasetParams
    from flows.dataset import parser as dataset_parser
    from flows.evaluate import EvaluateParams
    from flows.evaluate import parser as evaluate_parser
    from flows.ingest import IngestParams
    from flows.ingest import parser as ingest_parser
    from flows.params import parse_params

    a = car_filter_parser().parse_args(["--storage", "s", "score", "--threshold", "0.5", "--refresh"])
    assert parse_params(ScoreParams, a) == ScoreParams(storage="s", threshold=0.5, refresh=True)
    a = crop_parser().parse_args(["--imgsz", "640", "--storage", "s", "train", "--data", "d.yaml", "--imgsz", "64"])
    assert parse_params(DetectorTrainParams, a, dest_prefix="train_").imgsz == 64
    assert parse_params(CropParams, a).imgsz == 640
    a = dataset_parser().parse_args(["--export", "e", "--ignore", "a", "b"])
    assert parse_params(DatasetParams, a) == DatasetParams(export_uri="e", ignore=["a", "b"])
    assert parse_params(EvaluateParams, evaluate_parser().parse_args(["--no-calibrate"])).calibrate is False
    a = ingest_parser().parse_args(["--site", "a", "--site", "b", "--import-site", "seed"])
    assert parse_params(IngestParams, a) == IngestParams(sites=["a", "b"], site="seed")
    assert parse_params(IngestParams, ingest_parser().parse_args([])) == IngestParams()  # unset = the defaults


@pytest.mark.parametrize(("argv", "flag"), [
    (["clean", "--shard-size", "many"], "--shard-size"),
    (["clean", "--shard-size", "0"], "--shard-size"),
    (["car-filter", "score", "--threshold", "1.5"], "--threshold"),
    (["dataset", "--conflict-policy", "coin-flip"], "--conflict-policy"),
    (["crawl", "demo", "--max-listings", "lots"], "--max-listings"),
    (["crop", "--no-such-flag"], "--no-such-flag"),
    (["train", "--epochs", "ten"], "--epochs"),
])
def test_a_bad_flag_is_one_line_naming_it(argv, flag, capsys):
    from flows.cli import main

    assert main(argv) == 2
    out = capsys.readouterr()
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("carflow"), out.err
    assert flag in lines[0] and "Traceback" not in out.err + out.out


def test_a_bad_flag_through_the_command_line_exits_2(tmp_path):
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "clean", "--shard-size", "many"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [
        "carflow: --shard-size: Input should be a valid integer, unable to parse string as an integer (got 'many')"]


# -- refresh ----------------------------------------------------------------------------------
def test_run_shard_refresh_recomputes_and_overwrites(tmp_path):
    import pyarrow as pa

    from carflow.storage import LocalStorage
    from tasks.shards import ShardSpec, run_shard

    store, spec, runs = LocalStorage(tmp_path), ShardSpec("demo", "1"), []

    def compute(ids):
        runs.append(ids)
        return pa.table({"image_id": ids, "n": [len(runs)] * len(ids)}), {"run": len(runs)}

    assert run_shard(store, spec, ["a", "b"], compute)["reused"] is False
    assert run_shard(store, spec, ["a", "b"], compute)["reused"] is True and len(runs) == 1
    again = run_shard(store, spec, ["a", "b"], compute, refresh=True)
    assert again["reused"] is False and again["stats"]["run"] == 2 and len(runs) == 2
    assert json.loads(store.get_text(spec.stats_key(["a", "b"])))["run"] == 2  # overwritten
    assert run_shard(store, spec, ["a", "b"], compute)["stats"]["run"] == 2  # and reused from then on


def _photos_manifest(root: Path, n: int = 4) -> str:
    from carflow.manifest import INGEST_SCHEMA, from_records, manifest_key, write_manifest
    from carflow.storage import open_storage

    store = open_storage(str(root))
    rng = np.random.default_rng(1)
    rows = []
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (72, 96, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
        image_id = store.put_image(buf.getvalue())
        rows.append({"image_id": image_id, "listing_id": f"x:{i}", "site": "x", "url": None, "photo_index": 0,
                     "make": None, "model": None, "year": None, "label": None, "make_raw": None, "model_raw": None,
                     "raw_key": f"raw/{image_id[:2]}/{image_id}", "bytes": len(buf.getvalue()), "content_type": None,
                     "source": "folders", "crawl_id": None, "first_seen": i, "status": "kept", "reason": None})
    write_manifest(store, manifest_key("ingest"), from_records(rows, INGEST_SCHEMA), INGEST_SCHEMA)
    return str(root)


@pytest.mark.integration
def test_clean_refresh_decodes_again_and_the_default_reuses(tmp_path, prefect_server):
    from carflow.storage import open_storage
    from flows.clean import CleanParams, clean

    uri = _photos_manifest(tmp_path / "store")
    first = clean(storage=uri, shard_size=2)
    assert first["shards"] == 2 and first["inspected_images"] == 4
    store = open_storage(uri)
    stats_keys = sorted(k for k in store.list("work/inspect/") if k.endswith(".stats.json"))
    assert len(stats_keys) == 2
    for key in stats_keys:  # mark the stored shards: a reuse keeps the mark, a recompute overwrites it
        store.put_text(key, json.dumps({**json.loads(store.get_text(key)), "marked": True}))

    again = clean(CleanParams(storage=uri, shard_size=2))
    assert again["cached_shards"] == 2 and again["inspected_images"] == 0
    assert all(json.loads(store.get_text(k)).get("marked") for k in stats_keys)

    refreshed = clean(params={"storage": uri, "shard_size": 2, "refresh": True})
    assert refreshed["cached_shards"] == 0 and refreshed["inspected_images"] == 4
    assert not any(json.loads(store.get_text(k)).get("marked") for k in stats_keys)
    assert {k: refreshed[k] for k in ("rows", "kept", "dropped_by_reason")} == \
        {k: first[k] for k in ("rows", "kept", "dropped_by_reason")}


def test_export_refresh_encodes_again_and_the_default_reuses(tmp_path):
    """The dataset's TFRecord export (its own content-keyed shards): a rerun encodes
    nothing, ``refresh`` encodes every image again into the same shard keys."""
    from carflow.storage import open_storage
    from tasks.export import export_tfrecords
    from tests.test_export import SIZE, classed, crop_manifest

    store = open_storage(str(tmp_path / "s"))
    ds, doc = classed(crop_manifest(store, n_listings=10, photos=2)[0])
    first = export_tfrecords(ds, store, doc, size=SIZE, shard_images=5)
    assert first["encoded"] == 20
    again = export_tfrecords(ds, store, doc, size=SIZE, shard_images=5)
    assert again["encoded"] == 0 and again["shards_written"] == 0
    refreshed = export_tfrecords(ds, store, doc, size=SIZE, shard_images=5, refresh=True)
    assert refreshed["encoded"] == 20 and refreshed["shards_reused"] == 0
    assert _shard_keys(refreshed) == _shard_keys(first)


def _shard_keys(index: dict) -> list[str]:
    return sorted(s["key"] for split in index["splits"].values() for s in split["shards"])


def test_a_flow_run_ends_without_waiting_for_its_heartbeat_thread():
    """Prefect's sync engine joined the flow-run heartbeat thread, which sleeps in 1 s
    steps, so every flow call returned up to 1 s after its run had ended. With
    flows.engine.prompt_heartbeat_stop (applied by every ParamsFlow call) the heartbeat
    is still sent, and the exit no longer waits for the thread's next step."""
    import threading
    import time
    from types import SimpleNamespace

    from prefect import flow_engine

    from flows.engine import prompt_heartbeat_stop

    assert prompt_heartbeat_stop() and prompt_heartbeat_stop()  # idempotent
    sent = []

    class Engine:
        heartbeat_seconds = 30
        flow_run = SimpleNamespace(state=SimpleNamespace(is_final=lambda: False))
        logger = SimpleNamespace(debug=lambda *a, **k: None)

        def _build_heartbeat_event_template(self):
            return None, None

        def _emit_flow_run_heartbeat(self, resource, related):
            sent.append(time.monotonic())

    before = set(threading.enumerate())
    with flow_engine._send_heartbeats(Engine()):
        deadline = time.monotonic() + 5
        while not sent and time.monotonic() < deadline:
            time.sleep(0.01)
        t = time.monotonic()
    assert time.monotonic() - t < 0.5 and len(sent) == 1
    beat = [th for th in threading.enumerate() if th not in before]
    for th in beat:  # the daemon thread stops at its next step, sending nothing more
        th.join(timeout=3)
        assert not th.is_alive()
    assert len(sent) == 1
