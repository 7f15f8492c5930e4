"""The make/model classifier: a Keras 3 model and the one predictor that the pipeline,
evaluation and serving all call.

:func:`build_classifier` takes **uint8** images ``[N, S, S, 3]``, does its backbone's own
preprocessing inside (EfficientNet rescales and normalises inside itself; ResNet50V2 and
MobileNetV2 want [-1, 1]), augments while training (Keras' flip and contrast layers and
one batched affine warp, :mod:`models.augment`), and ends global pooling → dropout → dense (L2 on the kernel). It outputs
**logits**: no softmax or sigmoid in the graph, so a temperature fitted later divides
them exactly. Serving and evaluation can never feed it differently from training.

The code is backend-agnostic Keras 3: it trains and predicts under
``KERAS_BACKEND=tensorflow`` (the default) and ``KERAS_BACKEND=torch``, and nothing here
imports TensorFlow itself (Keras does, on its TensorFlow backend, through
:func:`carflow.frameworks.import_keras`).

Training phases (:func:`set_phase`), as in the Keras transfer-learning guide:

- ``head``: the base frozen; its BatchNorm layers then run in inference mode (Keras 3: a
  non-trainable BatchNormalization uses its moving statistics);
- ``finetune``: the top ``finetune_layers`` layers of the base trainable, every
  BatchNorm still frozen;
- ``full``: everything trainable, BatchNorm in training mode: what ``weights=none``
  needs (a random base has nothing to transfer).

:class:`ClassifierPredictor` loads a registered version (``Registry.resolve``) and runs
its OpenVINO export on a CPU when there is one, the Keras model otherwise.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from carflow.errors import WeightsError  # noqa: F401 - the one weights error (re-exported)
from carflow.frameworks import import_keras

SETTING = "train.weights"
ENV = "CARFLOW_TRAIN__WEIGHTS"

#: backbone → (keras.applications class, scale inputs to [-1, 1] outside the base?)
BACKBONES: dict[str, tuple[str, bool]] = {
    "efficientnetb1": ("EfficientNetB1", False),  # rescaling + normalisation inside the base
    "resnet50v2": ("ResNet50V2", True),
    "mobilenetv2": ("MobileNetV2", True),
}
BASE_NAME = "backbone"
AUGMENT_NAME = "augment"
LOGITS_NAME = "logits"
TASKS = ("multiclass", "multilabel")
#: files of a registered classifier version
MODEL_FILE, LABELS_FILE, CONFIG_FILE = "model.keras", "labels.json", "config.json"
#: out-of-fold logits of every train (and val) row of a ``--cv`` run: ``image_ids``, ``splits``,
#: ``folds``, ``logits`` (``np.savez``; written by ``tasks.train``, read by ``tasks.evaluate``)
OOF_FILE = "oof_logits.npz"




def _get(cfg: Any, name: str, default: Any = None) -> Any:
    if isinstance(cfg, dict):
        return cfg.get(name, default)
    return getattr(cfg, name, default)


def is_pretrained(cfg: Any) -> bool:
    """True unless ``weights`` is ``none``: a base with something to transfer."""
    return str(_get(cfg, "weights", "none")).strip().lower() != "none"


def _augmentation(keras: Any, cfg: Any, value_range: tuple[float, float]) -> Any | None:
    """Flip, one affine warp (rotation + zoom + translation: :class:`models.augment.RandomAffine`,
    batched on every backend), contrast (clipped to ``value_range``: the pixel range after
    the backbone's scaling); ``None`` when every field is off."""
    from models.augment import RandomAffine

    layers = []
    if _get(cfg, "flip", False):
        layers.append(keras.layers.RandomFlip("horizontal"))
    rotation, zoom, translation = (float(_get(cfg, k, 0) or 0) for k in ("rotation", "zoom", "translation"))
    if rotation or zoom or translation:
        layers.append(RandomAffine(rotation, zoom, translation, name="affine"))
    if _get(cfg, "contrast", 0):
        layers.append(keras.layers.RandomContrast(float(_get(cfg, "contrast")), value_range=value_range))
    return keras.Sequential(layers, name=AUGMENT_NAME) if layers else None


def _base(keras: Any, backbone: str, size: int, weights: str | None, alpha: float) -> Any:
    try:
        cls_name, _ = BACKBONES[backbone]
    except KeyError:
        raise WeightsError(f"train.backbone [CARFLOW_TRAIN__BACKBONE] = {backbone!r}: use one of "
                           f"{', '.join(BACKBONES)}") from None
    kwargs: dict[str, Any] = {"include_top": False, "weights": weights, "input_shape": (size, size, 3)}
    if backbone == "mobilenetv2":
        kwargs["alpha"] = alpha
    try:
        base = getattr(keras.applications, cls_name)(**kwargs)
    except Exception as exc:
        if weights != "imagenet":
            raise
        raise WeightsError(
            f"{SETTING} [{ENV}] = imagenet: the {cls_name} ImageNet weights could not be loaded "
            f"({exc.__class__.__name__}: {str(exc)[:200]}); on a machine without internet set {SETTING} to a "
            "downloaded .keras/.weights.h5 path or s3:// URI, or 'none' to train from scratch") from exc
    base.name = BASE_NAME
    if weights is None:
        # From scratch on a small label set the default BN momentum (0.99/0.999) leaves the
        # moving statistics far from the data after a few hundred steps (as in the car filter).
        for layer in base.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.momentum = 0.9
    return base


def build_classifier(num_outputs: int, cfg: Any, task: str = "multiclass") -> Any:
    """uint8 ``[N, S, S, 3]`` → logits ``[N, num_outputs]``.

    ``cfg``: a :class:`carflow.settings.TrainSettings` (or a dict of its fields):
    ``backbone``, ``weights`` (``imagenet`` | ``none`` | a ``.keras`` / ``.weights.h5``
    path or ``s3://`` URI), ``alpha``, ``image_size``, ``dropout``, ``l2`` and the
    augmentation fields. ``task`` only names the model (the head is the same dense
    layer; the loss decides softmax or sigmoid)."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    keras = import_keras()
    size = int(_get(cfg, "image_size", 240))
    backbone = str(_get(cfg, "backbone", "efficientnetb1")).lower()
    spec = str(_get(cfg, "weights", "none")).strip()
    if not spec:
        raise WeightsError(f"{SETTING} [{ENV}] is empty: use 'imagenet', 'none', or a weight file path/URI")
    base_weights = "imagenet" if spec.lower() == "imagenet" else None
    file_weights = None if spec.lower() in ("imagenet", "none") else spec
    if file_weights and not file_weights.endswith((".keras", ".h5")):
        raise WeightsError(f"{SETTING} [{ENV}] = {spec!r} is neither 'imagenet', 'none' nor a .keras/.weights.h5 file")

    inputs = keras.Input((size, size, 3), dtype="uint8", name="image")
    if BACKBONES.get(backbone, ("", True))[1]:
        x = keras.layers.Rescaling(1 / 127.5, offset=-1.0, name="preprocess")(inputs)
        value_range = (-1.0, 1.0)
    else:  # the base normalises itself; the layer only casts uint8 → float
        x = keras.layers.Rescaling(1.0, name="preprocess")(inputs)
        value_range = (0.0, 255.0)
    augment = _augmentation(keras, cfg, value_range)
    if augment is not None:
        x = augment(x)
    x = _base(keras, backbone, size, base_weights, float(_get(cfg, "alpha", 1.0)))(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    x = keras.layers.Dropout(float(_get(cfg, "dropout", 0.2)), name="dropout")(x)
    l2 = float(_get(cfg, "l2", 0.0))
    outputs = keras.layers.Dense(
        num_outputs, dtype="float32", name=LOGITS_NAME,
        kernel_regularizer=keras.regularizers.L2(l2) if l2 else None,
    )(x)
    model = keras.Model(inputs, outputs, name=f"classifier_{task}")
    if file_weights:
        _load_weights(keras, model, file_weights)
    return model


def load_keras_model(path: str | Path, compile: bool = False) -> Any:
    """``keras.models.load_model`` for a classifier file, training checkpoints included
    (their ``augment`` sub-model holds :class:`models.augment.RandomAffine`, their optimizer
    :class:`models.schedules.WarmupCosineDecay`, registered by importing those modules
    first)."""
    import models.augment  # noqa: F401 - registers carflow>RandomAffine for deserialisation
    import models.schedules  # noqa: F401 - registers carflow>WarmupCosineDecay (checkpoints' optimizer)

    return import_keras().models.load_model(path, compile=compile)


def _load_weights(keras: Any, model: Any, spec: str) -> None:
    from models.car_filter import local_weights

    path = local_weights(spec, what=SETTING, env=ENV)
    if not path.endswith(".keras"):
        model.load_weights(path)
        return
    src = load_keras_model(path)
    try:
        model.set_weights(src.get_weights())
    except ValueError as exc:
        raise WeightsError(f"{SETTING} [{ENV}] = {spec!r} does not fit this architecture "
                           f"(backbone, image size, classes): {exc}") from exc


def base_of(model: Any) -> Any:
    return model.get_layer(BASE_NAME)


def set_phase(model: Any, phase: str, finetune_layers: int = 40) -> int:
    """Make ``model`` trainable for ``phase`` (``head`` | ``finetune`` | ``full``);
    returns how many layers of the base are trainable. Recompile afterwards."""
    keras = import_keras()
    base = base_of(model)
    if phase == "full":
        base.trainable = True
        for layer in base.layers:
            layer.trainable = True
        return len(base.layers)
    if phase == "head":
        base.trainable = False
        return 0
    if phase != "finetune":
        raise ValueError(f"unknown phase {phase!r}")
    base.trainable = True
    n = len(base.layers) if finetune_layers < 0 else min(finetune_layers, len(base.layers))
    cut = len(base.layers) - n
    count = 0
    for i, layer in enumerate(base.layers):
        train = i >= cut and not isinstance(layer, keras.layers.BatchNormalization)
        layer.trainable = train
        count += int(train)
    return count


def inference_model(model: Any) -> Any:
    """The same layers (shared weights) without the augmentation sub-model: what is
    registered, exported and served."""
    keras = import_keras()
    names = [layer.name for layer in model.layers]
    if AUGMENT_NAME not in names:
        return model
    inputs = keras.Input(model.input_shape[1:], dtype="uint8", name="image")
    x = inputs
    for layer in model.layers[1:]:
        if layer.name != AUGMENT_NAME:
            x = layer(x)
    return keras.Model(inputs, x, name=model.name)


def float32_copy(model: Any, num_outputs: int, cfg: Any, task: str) -> Any:
    """``model`` (trained under a mixed-precision policy) rebuilt in float32 with the same
    weights, so the registered model runs anywhere."""
    keras = import_keras()
    previous = keras.config.dtype_policy()
    try:
        keras.config.set_dtype_policy("float32")
        fresh = build_classifier(num_outputs, {**_as_dict(cfg), "weights": "none"}, task)
    finally:
        keras.config.set_dtype_policy(previous)
    fresh.set_weights(model.get_weights())
    return fresh


def _as_dict(cfg: Any) -> dict[str, Any]:
    if isinstance(cfg, dict):
        return dict(cfg)
    if hasattr(cfg, "model_dump"):
        return cfg.model_dump()
    return dict(vars(cfg))


# ---------------------------------------------------------------------------------------
# the predictor
# ---------------------------------------------------------------------------------------
def resize_batch(images: np.ndarray | Sequence[np.ndarray], size: int) -> np.ndarray:
    """uint8 ``[N, size, size, 3]`` from an array batch or a list of arrays of any size
    (RGB; greyscale and RGBA converted), resized bilinearly when their size differs."""
    from PIL import Image

    if isinstance(images, np.ndarray) and images.ndim == 4 and images.shape[1:] == (size, size, 3):
        return np.ascontiguousarray(images.astype(np.uint8, copy=False))
    out = np.empty((len(images), size, size, 3), np.uint8)
    for i, img in enumerate(images):
        arr = np.asarray(img)
        if arr.dtype != np.uint8:
            arr = np.clip(arr, 0, 255).astype(np.uint8)
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=-1)
        elif arr.shape[-1] == 4:
            arr = arr[..., :3]
        if arr.shape[:2] != (size, size):
            arr = np.asarray(Image.fromarray(arr).resize((size, size), Image.Resampling.BILINEAR))
        out[i] = arr
    return out


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


class ClassifierPredictor:
    """Images → logits / probabilities / top-k labels of one classifier version.

    ``runtime``: ``auto`` (OpenVINO export on a CPU when the version has one, else
    Keras), ``keras`` or ``openvino``. ``temperature`` comes from ``config.json`` (1.0
    until evaluation fits one); ``predict_proba(calibrated=True)`` divides by it."""

    def __init__(self, model: Any, labels: list[str], task: str = "multiclass", image_size: int | None = None,
                 temperature: float = 1.0, version: str = "", config: dict[str, Any] | None = None,
                 runtime: str = "keras", batch_size: int = 64):
        self.model = model
        self.labels = list(labels)
        self.task = task
        self.image_size = int(image_size or model.input_shape[1])
        self.temperature = float(temperature or 1.0)
        self.version = version
        self.config = dict(config or {})
        self.runtime = runtime
        self.batch_size = batch_size
        self._torch = runtime == "keras" and import_keras().backend.backend() == "torch"
        if self._torch:
            from models.fast_layers import accelerate

            accelerate(model)  # inference BatchNorm in one kernel, copy-free convs, direct graph calls

    def _no_grad(self) -> Any:
        """``torch.no_grad()`` on the torch backend (a direct model call records the
        autograd graph otherwise: memory and time for nothing at inference)."""
        if self._torch:
            import torch

            return torch.no_grad()
        return contextlib.nullcontext()

    # -- loading -------------------------------------------------------------------------
    @classmethod
    def load(cls, spec: Any = "latest", storage: Any = None, runtime: str = "auto",
             setting: str | None = "serve.model") -> ClassifierPredictor:
        """A registered version: ``latest``, a version id, a folder or ``s3://`` URI
        (through :meth:`carflow.registry.Registry.resolve`), or a
        :class:`carflow.registry.Version`."""
        from carflow.registry import Registry, Version

        version = spec if isinstance(spec, Version) else Registry(storage).resolve("classifier", spec, setting)
        config = json.loads(version.get(CONFIG_FILE)) if version.exists(CONFIG_FILE) else {}
        labels = json.loads(version.get(LABELS_FILE))
        labels = labels["labels"] if isinstance(labels, dict) else labels
        meta = version.meta or {}
        task = config.get("task") or meta.get("task") or "multiclass"
        temperature = float(meta.get("temperature") or config.get("temperature") or 1.0)
        size = int(config.get("image_size") or 0) or None
        runtime = (runtime or "auto").lower()
        if runtime == "auto":
            runtime = "openvino" if version.exists("model.xml") and _openvino_available() and not _has_gpu() else "keras"
        with tempfile.TemporaryDirectory(prefix="carflow-classifier-") as tmp:
            if runtime == "openvino":
                from models.openvino import BIN, XML, OpenVinoModel

                for name in (XML, BIN):
                    Path(tmp, name).write_bytes(version.get(name))
                model = OpenVinoModel(Path(tmp, XML), "fp32")
            else:
                path = Path(tmp, MODEL_FILE)
                path.write_bytes(version.get(MODEL_FILE))
                model = load_keras_model(path)
        return cls(model, labels, task, size, temperature, version.version, config, runtime)

    # -- predicting ----------------------------------------------------------------------
    def logits(self, images: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
        """uint8 images ``[N, H, W, 3]`` (or a list of arrays of any size) → ``[N, C]``."""
        x = resize_batch(images, self.image_size)
        if len(x) == 0:
            return np.zeros((0, len(self.labels)), np.float32)
        outs = []
        for start in range(0, len(x), self.batch_size):
            chunk = x[start:start + self.batch_size]
            if self.runtime == "openvino":
                outs.append(np.asarray(self.model(chunk), np.float32))
            else:
                keras = import_keras()
                with self._no_grad():
                    outs.append(np.asarray(keras.ops.convert_to_numpy(self.model(chunk, training=False)), np.float32))
        return np.concatenate(outs).reshape(len(x), -1)

    def predict_proba(self, images: np.ndarray | Sequence[np.ndarray], calibrated: bool = True) -> np.ndarray:
        z = self.logits(images)
        if calibrated:
            z = z / self.temperature
        return sigmoid(z) if self.task == "multilabel" else softmax(z)

    def top_k(self, images: np.ndarray | Sequence[np.ndarray], k: int = 5) -> list[list[tuple[str, float]]]:
        p = self.predict_proba(images)
        k = min(k, p.shape[1])
        order = np.argsort(-p, axis=1)[:, :k]
        return [[(self.labels[j], float(p[i, j])) for j in row] for i, row in enumerate(order)]


def _openvino_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("openvino") is not None


def _has_gpu() -> bool:
    """A GPU for the current Keras backend, asked without importing another framework."""
    backend = os.environ.get("KERAS_BACKEND", "tensorflow")
    if backend == "torch":
        import torch

        return bool(torch.cuda.is_available())
    if backend == "jax":
        import jax

        return any(d.platform == "gpu" for d in jax.devices())
    from carflow.frameworks import import_tensorflow

    return bool(import_tensorflow().config.list_physical_devices("GPU"))
