"""The model stages of the DAG (car filter, crop) as the nightly and demo flows run them:
fail fast when an enabled stage has no model, and the *pass-through* a stage writes when
it is off.

- :func:`check_car_filter_model` / :func:`check_crop_weights`: the model a stage will use,
  checked before the crawl; :class:`StageNotReady` names the setting and how to make one.
- :func:`passthrough` (a task): ``manifests/<stage>/manifest.parquet`` = its input,
  unchanged, marked ``carflow.passthrough`` in the Parquet metadata and with the input's
  lineage, so the next stage never reads a stale manifest left by a run with the stage on.
"""

from __future__ import annotations

import io
import json
from typing import Any

import pyarrow.parquet as pq
from prefect import task

from carflow.manifest import KEPT, manifest_key, read_input, write_manifest
from carflow.registry import RegistryError
from carflow.settings import SettingsError, get_settings
from carflow.storage import Storage, open_storage

#: the model stages in DAG order, and the stage each one reads
MODEL_STAGES = {"car_filter": "clean", "crop": "car_filter"}
PASSTHROUGH_META = b"carflow.passthrough"


class StageNotReady(SettingsError):
    """An enabled stage has no model to run with; the message names the setting."""


def _prefix() -> str:
    return get_settings().runtime.manifests_prefix


def check_car_filter_model(storage: str | None, model: str | None = None) -> dict[str, Any]:
    """The car filter model the stage will score with (``tasks.car_filter.resolve_model``:
    ``model``, else ``car_filter.model``, else the registry's ``latest``), checked to
    exist. Raises :class:`StageNotReady` naming ``car_filter.model`` / ``car_filter.enabled``
    and the commands that make a model."""
    from tasks.car_filter import resolve_model

    cfg = get_settings().car_filter
    fix = (
        "Make one: run the pipeline once with the stage off to get a clean manifest, then "
        "`carflow car-filter kit` (a labelling kit: labels.csv + thumbnails), fill in "
        "car / no_car, and `carflow car-filter train --labels <labels.csv>`; or set "
        "car_filter.model [CARFLOW_CAR_FILTER__MODEL] to a trained version; or turn the stage off: "
        "car_filter.enabled=false [CARFLOW_CAR_FILTER__ENABLED=false]."
    )
    try:
        return resolve_model(open_storage(storage), cfg, model)
    except RegistryError as exc:
        raise StageNotReady(f"car_filter.enabled is true but there is no car filter model: {exc}. {fix}") from None


def check_crop_weights(weights: str | None = None, storage: Storage | str | None = None) -> str:
    """``crop.weights`` (or ``weights``) resolved without loading a model (``latest`` in
    ``storage``'s registry); a missing file raises the detector's error naming
    ``crop.weights`` [CARFLOW_CROP__WEIGHTS]."""
    from tasks.detector_train import check_weights

    spec = weights or get_settings().crop.weights
    try:
        check_weights(spec, storage)
    except SettingsError as exc:
        raise StageNotReady(
            f"{exc}. Fine-tune one (`carflow crop train --data data.yaml`, then crop.weights=latest) or turn "
            "the stage off: crop.enabled=false [CARFLOW_CROP__ENABLED=false]."
        ) from None
    return spec


@task(name="passthrough-manifest")
def passthrough(storage: str | None, stage: str, source: str) -> dict[str, Any]:
    """A stage that is off: ``manifests/<stage>/manifest.parquet`` = the ``source`` stage's
    manifest (checked current), unchanged, with ``carflow.passthrough`` in its Parquet
    metadata and the source as its lineage."""
    store = open_storage(storage)
    prefix = _prefix()
    inp = read_input(store, manifest_key(source, prefix=prefix))
    meta = dict(inp.table.schema.metadata or {})
    meta[PASSTHROUGH_META] = json.dumps({"stage": stage, "input": inp.key,
                                         "reason": f"{stage}.enabled is false"}).encode()
    uri = write_manifest(store, manifest_key(stage, prefix=prefix), inp.table.replace_schema_metadata(meta),
                         lineage=inp.lineage())
    status = inp.table.column("status").to_pylist()
    return {"manifest": uri, "input": store.uri(inp.key), "enabled": False, "rows": inp.table.num_rows,
            "kept": sum(s == KEPT for s in status), "dropped_by_reason": {}}


def passthrough_of(store: Storage, stage: str) -> dict[str, Any] | None:
    """The pass-through record of ``stage``'s manifest (``{"stage", "input", "reason"}``),
    or ``None`` when the stage really ran."""
    key = manifest_key(stage, prefix=_prefix())
    meta = pq.ParquetFile(io.BytesIO(store.get(key))).schema_arrow.metadata or {}
    raw = meta.get(PASSTHROUGH_META)
    return json.loads(raw) if raw else None
