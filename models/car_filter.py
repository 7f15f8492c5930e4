"""The car/no-car filter: a MobileNetV2 backbone with a binary sigmoid head.

Preprocessing is inside the model (``Rescaling`` to [-1, 1]), so the model takes RGB
pixels in [0, 255] at ``image_size`` × ``image_size`` and returns ``p_car``.

``weights`` (setting ``car_filter.weights`` / ``CARFLOW_CAR_FILTER__WEIGHTS``):

- ``imagenet``: keras.applications ImageNet weights for the backbone (needs internet
  on first use);
- a local path or ``s3://`` URI of a ``.keras`` model or a ``.weights.h5`` file for the
  whole model (downloaded through :mod:`carflow.storage` to a temporary file);
- ``none``: random initialisation (tests, offline demo).

A missing weight file raises :class:`WeightsError` naming the setting; nothing ever
falls back to random weights silently. TensorFlow/Keras are imported lazily: importing
this module loads nothing.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from carflow.frameworks import import_keras, import_tensorflow
from models.openvino import OpenVinoModel  # noqa: F401 - scoring's CPU runtime (models/openvino.py)

SETTING = "car_filter.weights"
ENV = "CARFLOW_CAR_FILTER__WEIGHTS"


class WeightsError(FileNotFoundError):
    """The configured weight file does not exist or cannot be used."""


def _split_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b/file`` → (``s3://bucket/a/b``, ``file``)."""
    head, _, name = uri.rstrip("/").rpartition("/")
    return head, name


@contextmanager
def local_copy(uri: str, what: str = SETTING, env: str = ENV):
    """A local path for ``uri`` (a path, ``file://`` or ``s3://`` URI); remote files are
    downloaded to a temporary file that is removed afterwards."""
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    if "://" not in uri:
        path = Path(uri).expanduser()
        if not path.is_file():
            raise WeightsError(
                f"weight file {uri!r} does not exist: set {what} [{env}] to an existing "
                ".keras/.weights.h5 path or s3:// URI, 'imagenet', or 'none' for random init"
            )
        yield str(path)
        return
    from carflow.storage import open_storage

    head, name = _split_uri(uri)
    try:
        data = open_storage(head).get(name)
    except (KeyError, FileNotFoundError, OSError) as exc:
        raise WeightsError(
            f"weight file {uri!r} could not be read ({exc.__class__.__name__}: {exc}): set {what} "
            f"[{env}] to an existing .keras/.weights.h5 path or s3:// URI, 'imagenet', or 'none'"
        ) from exc
    except Exception as exc:  # botocore ClientError (NoSuchKey/NoSuchBucket) and friends
        raise WeightsError(
            f"weight file {uri!r} could not be read ({exc.__class__.__name__}: {exc}): set {what} [{env}]"
        ) from exc
    suffix = ".weights.h5" if name.endswith(".weights.h5") else Path(name).suffix
    fd, tmp = tempfile.mkstemp(prefix="carflow-weights-", suffix=suffix)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        yield tmp
    finally:
        Path(tmp).unlink(missing_ok=True)


def _architecture(image_size: int, alpha: float, backbone_weights: str | None):
    keras = import_keras()

    inputs = keras.Input((image_size, image_size, 3), name="image")
    x = keras.layers.Rescaling(1 / 127.5, offset=-1.0, name="to_unit_range")(inputs)
    backbone = keras.applications.MobileNetV2(
        include_top=False,
        weights=backbone_weights,
        input_shape=(image_size, image_size, 3),
        alpha=alpha,
        pooling="avg",
    )
    if backbone_weights is None:
        # From scratch on a small label set, the default BN momentum (0.999) leaves the
        # moving statistics far from the data after a few hundred steps, and inference
        # (which uses them) is then much worse than training. 0.9 tracks the data.
        for layer in backbone.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.momentum = 0.9
    x = backbone(x)
    x = keras.layers.Dropout(0.2, name="dropout")(x)
    outputs = keras.layers.Dense(1, activation="sigmoid", dtype="float32", name="p_car")(x)
    return keras.Model(inputs, outputs, name="car_filter")


def build_car_filter(weights: str, image_size: int, alpha: float = 1.0) -> Any:
    """MobileNetV2 + sigmoid head (``p_car``), preprocessing inside the model.

    ``weights``: ``imagenet`` | ``none`` | a local path / ``s3://`` URI of a ``.keras``
    model (loaded as is) or a ``.weights.h5`` file (loaded into this architecture)."""
    spec = (weights or "").strip()
    if not spec:
        raise WeightsError(f"{SETTING} [{ENV}] is empty: use 'imagenet', 'none', or a weight file path/URI")
    if spec.lower() == "none":
        return _architecture(image_size, alpha, None)
    if spec.lower() == "imagenet":
        return _architecture(image_size, alpha, "imagenet")
    if not (spec.endswith(".keras") or spec.endswith(".h5")):
        raise WeightsError(
            f"{SETTING} [{ENV}] = {spec!r} is neither 'imagenet', 'none' nor a .keras/.weights.h5 file"
        )
    with local_copy(spec) as path:
        keras = import_keras()

        if path.endswith(".keras"):
            model = keras.models.load_model(path, compile=False)
            got = model.input_shape[1]
            if got != image_size:
                raise WeightsError(
                    f"{SETTING} [{ENV}] = {spec!r} takes {got}px inputs but car_filter.image_size "
                    f"[CARFLOW_CAR_FILTER__IMAGE_SIZE] is {image_size}"
                )
            return model
        model = _architecture(image_size, alpha, None)
        model.load_weights(path)
        return model


def load_model_file(uri: str) -> Any:
    """A saved ``model.keras`` (path or ``s3://`` URI) without its optimizer state."""
    keras = import_keras()

    with local_copy(uri, what="car_filter.model", env="CARFLOW_CAR_FILTER__MODEL") as path:
        return keras.models.load_model(path, compile=False)


def for_inference(model: Any, image_size: int, alpha: float) -> Any:
    """On a GPU, the same weights in a ``mixed_float16`` copy of the architecture (fp16
    compute, fp32 output); on a CPU the model unchanged."""
    tf = import_tensorflow()

    if not tf.config.list_physical_devices("GPU"):
        return model
    keras = import_keras()

    previous = keras.mixed_precision.global_policy()
    try:
        keras.mixed_precision.set_global_policy("mixed_float16")
        fast = _architecture(image_size, alpha, None)
        fast.set_weights(model.get_weights())
        return fast
    except Exception:  # noqa: BLE001 - an unusual saved model: score it in fp32
        return model
    finally:
        keras.mixed_precision.set_global_policy(previous)


def resolve_runtime(runtime: str, precision: str) -> tuple[str, str]:
    """(``car_filter.runtime``, ``car_filter.precision``) → what scoring really uses.

    runtime ``auto``: Keras on a GPU, OpenVINO on a CPU. precision ``auto``: fp16
    (mixed_float16) on a GPU, fp32 on a CPU. ``bf16`` (OpenVINO only) is 1.8x faster on an
    AMX CPU but moved ``p_car`` by up to 0.20 (mean 0.012) on a from-scratch demo model,
    enough to flip threshold decisions, so it is opt-in."""
    tf = import_tensorflow()

    gpu = bool(tf.config.list_physical_devices("GPU"))
    r = (runtime or "auto").lower()
    if r == "auto":
        r = "keras" if gpu else "openvino"
    if r not in ("keras", "openvino"):
        raise WeightsError(f"car_filter.runtime [CARFLOW_CAR_FILTER__RUNTIME] = {runtime!r}: use auto, keras or openvino")
    p = (precision or "auto").lower()
    if p not in ("auto", "fp32", "bf16"):
        raise WeightsError(f"car_filter.precision [CARFLOW_CAR_FILTER__PRECISION] = {precision!r}: use auto, fp32 "
                           "or bf16")
    if p == "bf16" and r != "openvino":
        raise WeightsError("car_filter.precision [CARFLOW_CAR_FILTER__PRECISION] = bf16 needs "
                           "car_filter.runtime openvino (a CPU)")
    if p == "auto":
        p = "fp16" if r == "keras" and gpu else "fp32"
    return r, p


def for_runtime(model: Any, runtime: str, precision: str, alpha: float) -> Any:
    """``model`` ready for scoring with a resolved (runtime, precision)."""
    if runtime == "openvino":
        return OpenVinoModel(model, precision)
    if precision == "fp16":
        return for_inference(model, int(model.input_shape[1]), alpha)
    return model


def spread_random_init(model: Any, seed: int = 0) -> Any:
    """For benchmarks and tests with ``weights=none``: a random-init MobileNetV2 scores
    every image alike (its BN statistics are the init's). Settle the BN statistics on
    random pixels and give the head random weights scaled so that the logits of such
    images have mean 0 and std 1, so that outputs differ per image and a compared output
    difference means something. Returns ``model``, changed in place."""
    import numpy as np

    keras = import_keras()
    size = int(model.input_shape[1])
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 255, (16, size, size, 3)).astype("float32")
    for _ in range(30):
        model(x, training=True)
    head = model.get_layer("p_car")
    features = keras.Model(model.inputs, head.input)
    f = np.asarray(features(x, training=False), dtype=np.float64)
    kernel = rng.normal(0, 1, (f.shape[1], 1))
    logits = f @ kernel
    scale = float(logits.std()) or 1.0
    head.set_weights([(kernel / scale).astype("float32"), np.array([-logits.mean() / scale], "float32")])
    return model
