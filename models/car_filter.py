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

import threading
from collections.abc import Iterable
from typing import Any

import numpy as np

from carflow.errors import WeightsError  # noqa: F401 - the one weights error (re-exported)
from carflow.frameworks import import_keras, import_tensorflow
from carflow.storage import local_file
from models.openvino import OpenVinoModel  # noqa: F401 - scoring's CPU runtime (models/openvino.py)

SETTING = "car_filter.weights"
ENV = "CARFLOW_CAR_FILTER__WEIGHTS"




def local_weights(uri: str, what: str = SETTING, env: str = ENV) -> str:
    """A local path for ``uri`` (a path, ``file://`` or ``s3://`` URI) through
    :func:`carflow.storage.local_file`; a missing or unreadable file raises
    :class:`WeightsError` naming the setting ``what`` [``env``]."""
    try:
        return str(local_file(uri))
    except FileNotFoundError as exc:
        raise WeightsError(
            f"weight file {uri!r}: {exc}: set {what} [{env}] to an existing .keras/.weights.h5 path "
            "or s3:// URI, 'imagenet', or 'none' for random init"
        ) from None


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
    path = local_weights(spec)
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

    return keras.models.load_model(local_weights(uri, "car_filter.model", "CARFLOW_CAR_FILTER__MODEL"),
                                   compile=False)


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
    f = np.asarray(features.predict_on_batch(x), dtype=np.float64)
    kernel = rng.normal(0, 1, (f.shape[1], 1))
    logits = f @ kernel
    scale = float(logits.std()) or 1.0
    head.set_weights([(kernel / scale).astype("float32"), np.array([-logits.mean() / scale], "float32")])
    return model


# ---------------------------------------------------------------- inference


def has_gpu() -> bool:
    tf = import_tensorflow()

    return bool(tf.config.list_physical_devices("GPU"))


def decode_resize(data: Any, image_size: int) -> Any:
    """Encoded bytes (a scalar string tensor) → float32 ``image_size``² RGB in [0, 255].
    JPEGs are decoded at the largest DCT scale (1/2, 1/4, 1/8) that still leaves the short
    side ≥ ``image_size`` ("decode once, small"); other formats through ``decode_image``.

    The car filter's only preprocessing: training's tf.data input, the scoring stage
    (:meth:`CarFilterPredictor.predict_encoded`) and serving
    (:meth:`CarFilterPredictor.preprocess`) all run it on the clean stage's stored bytes."""
    tf = import_tensorflow()

    def jpeg():
        shape = tf.image.extract_jpeg_shape(data)
        short = tf.minimum(shape[0], shape[1])
        idx = (
            tf.cast(short >= 2 * image_size, tf.int32)
            + tf.cast(short >= 4 * image_size, tf.int32)
            + tf.cast(short >= 8 * image_size, tf.int32)
        )
        branches = [
            (lambda r=r: tf.io.decode_jpeg(data, channels=3, ratio=r, dct_method="INTEGER_FAST"))
            for r in (1, 2, 4, 8)
        ]
        return tf.switch_case(idx, branches)

    def other():
        return tf.io.decode_image(data, channels=3, expand_animations=False)

    img = tf.cond(tf.io.is_jpeg(data), jpeg, other)
    img = tf.image.resize(img, (image_size, image_size))
    img.set_shape((image_size, image_size, 3))
    return img


class CarFilterPredictor:
    """The car filter at inference: one model in one runtime, called by the scoring stage
    (``tasks/car_filter.py``) and by serving alike.

    - :meth:`load` (a ``model.keras`` path / ``s3://`` URI, cached per process) or the
      constructor (a Keras model, or an :class:`OpenVinoModel`);
    - :meth:`preprocess` (bytes → the model's input: :func:`decode_resize`, the one
      decode + resize of training, scoring and serving) and :meth:`predict_inputs`
      (a batch of those → ``p_car``): serving;
    - :meth:`predict_encoded`: encoded image bytes → ``p_car`` (NaN where undecodable)
      through tf.data (the same :func:`decode_resize`, in parallel, batch, prefetch):
      the scoring stage.

    The model takes RGB pixels in [0, 255] at ``image_size``²."""

    _cache: dict[str, CarFilterPredictor] = {}
    _cache_lock = threading.Lock()

    def __init__(self, model: Any, runtime: str = "keras", precision: str = "fp32", version: str | None = None,
                 batch_size: int = 64):
        self.model = model
        self.runtime = runtime
        self.precision = precision
        self.version = version
        self.batch_size = int(batch_size)
        self.image_size = int(model.input_shape[1])
        self._forward: Any = None
        self._preprocess: Any = None

    @classmethod
    def from_keras(cls, model: Any, runtime: str = "auto", precision: str = "auto", alpha: float = 1.0,
                   version: str | None = None, batch_size: int = 64) -> CarFilterPredictor:
        """A Keras car filter in the runtime/precision that ``resolve_runtime`` picks."""
        runtime, precision = resolve_runtime(runtime, precision)
        return cls(for_runtime(model, runtime, precision, alpha), runtime, precision, version, batch_size)

    @classmethod
    def load(cls, spec: str, runtime: str = "auto", precision: str = "auto", alpha: float = 1.0,
             version: str | None = None, batch_size: int = 64) -> CarFilterPredictor:
        """The saved ``model.keras`` at ``spec`` (path or URI) ready for inference. One
        predictor is kept per process (the last one loaded): scoring shards reuse it."""
        runtime, precision = resolve_runtime(runtime, precision)
        key = f"{spec}|{runtime}|{precision}"
        with cls._cache_lock:
            if key not in cls._cache:
                model = load_model_file(spec)
                cls._cache.clear()
                cls._cache[key] = cls(for_runtime(model, runtime, precision, alpha), runtime, precision, version,
                                      batch_size)
            return cls._cache[key]

    # -- the forward pass ------------------------------------------------------------------
    def forward(self, x: Any) -> np.ndarray:
        """A float batch (N, size, size, 3) in [0, 255] → ``p_car`` (N,) float32."""
        if self._forward is None:
            if isinstance(self.model, OpenVinoModel):
                self._forward = lambda b: self.model(b.numpy() if hasattr(b, "numpy") else b)
            else:
                tf = import_tensorflow()
                model = self.model
                # one compiled forward pass per predictor: no retracing per call
                self._forward = tf.function(lambda b: model(b, training=False), reduce_retracing=True)
        return np.asarray(self._forward(x), dtype=np.float32).reshape(-1)

    def preprocess(self, data: bytes) -> np.ndarray | None:
        """Encoded bytes → the model's input, float32 (size, size, 3) in [0, 255]: the ONE
        preprocessing of the car filter (:func:`decode_resize`: TensorFlow's JPEG decode
        at a reduced DCT scale, bilinear resize). :meth:`predict_encoded` (the scoring
        stage) maps the same function over tf.data, training maps it over its input
        pipeline, and serving calls this per upload on the fixer's stored bytes, so all
        three give the model the same pixels. None where the bytes do not decode (the
        scoring stage's ``not_scored``)."""
        tf = import_tensorflow()

        if self._preprocess is None:
            size = self.image_size
            self._preprocess = tf.function(lambda b: decode_resize(b, size),
                                           input_signature=[tf.TensorSpec([], tf.string)])
        if not data:
            return None
        try:
            return self._preprocess(tf.constant(data)).numpy()
        except (tf.errors.OpError, ValueError):
            return None

    def predict_inputs(self, x: np.ndarray, batch_size: int | None = None) -> np.ndarray:
        """``p_car`` for a batch of :meth:`preprocess` outputs (N, size, size, 3)."""
        x = np.asarray(x, np.float32)
        out = np.zeros(len(x), np.float32)
        bs = int(batch_size or self.batch_size)
        for start in range(0, len(x), bs):
            out[start : start + bs] = self.forward(x[start : start + bs])
        return out

    def predict_encoded(self, blobs: Iterable[bytes], count: int | None = None,
                        batch_size: int | None = None) -> np.ndarray:
        """``p_car`` for encoded images (NaN where the bytes are empty or undecodable).

        ``blobs`` may be a lazy iterator (bytes arriving from storage) of ``count`` items;
        it is consumed in chunks, so the Python side costs per chunk, not per image (the
        per-image work runs in tf.data's threads): parallel decode/resize (AUTOTUNE) →
        batch → prefetch → one compiled forward pass."""
        tf = import_tensorflow()

        if count is None:
            blobs = list(blobs)
            count = len(blobs)
        out = np.full(count, np.nan, dtype=np.float32)
        if not count:
            return out
        bs = int(batch_size or self.batch_size)
        chunk = max(64, bs)
        size = self.image_size

        def gen():
            idx: list[int] = []
            part: list[bytes] = []
            for i, data in enumerate(blobs):
                idx.append(i)
                part.append(data)
                if len(idx) == chunk:
                    yield np.asarray(idx, np.int64), np.asarray(part, dtype=object)
                    idx, part = [], []
            if idx:
                yield np.asarray(idx, np.int64), np.asarray(part, dtype=object)

        ds = tf.data.Dataset.from_generator(
            gen,
            output_signature=(tf.TensorSpec((None,), tf.int64), tf.TensorSpec((None,), tf.string)),
        )
        ds = (
            ds.prefetch(2)
            .unbatch()
            .map(lambda i, b: (i, decode_resize(b, size)), num_parallel_calls=tf.data.AUTOTUNE)
            .ignore_errors()
            .batch(bs)
            .prefetch(tf.data.AUTOTUNE)
        )
        for idx, x in ds:
            out[idx.numpy()] = self.forward(x)
        return out
