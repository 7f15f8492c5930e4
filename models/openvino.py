"""OpenVINO on the CPU: one home for the conversion, the file export and the compiled
model that the car filter and the classifier both run.

TensorFlow's CPU kernels for MobileNetV2 (depthwise convolutions) are 3× slower than
OpenVINO's in fp32 on the same cores, and TF's bf16 is slower still without OpenVINO's
kernels (measured: ``bench/car_filter.py``). :class:`OpenVinoModel` compiles a model
with the THROUGHPUT hint and splits a batch over the compiled model's parallel infer
requests. OpenVINO is imported lazily.
"""

from __future__ import annotations

import os
import threading
import warnings
from pathlib import Path
from typing import Any

#: the files of a model exported with :func:`export`
XML, BIN = "model.xml", "model.bin"


def convert(keras_model: Any) -> Any:
    """A Keras model (TensorFlow backend) → an in-memory ``openvino.Model`` (about 2 s)."""
    import openvino as ov

    size = int(keras_model.input_shape[1])
    with warnings.catch_warnings():  # Keras: "structure of `inputs` doesn't match" (a named input)
        warnings.simplefilter("ignore", UserWarning)
        return ov.convert_model(keras_model, input=[(-1, size, size, 3)])


def export(keras_model: Any, folder: str | os.PathLike[str]) -> list[Path]:
    """Write ``model.xml`` + ``model.bin`` for ``keras_model`` into ``folder`` with Keras'
    own OpenVINO exporter (any backend: TensorFlow, torch, JAX); returns the two paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.trace deprecation notes
        keras_model.export(str(folder / XML), format="openvino", verbose=False)
    return [folder / XML, folder / BIN]


class OpenVinoModel:
    """A model compiled by OpenVINO for the CPU: a Keras model (converted in memory by
    :func:`convert`), an ``openvino.Model`` or the path of an exported ``model.xml``.

    ``precision``: ``bf16`` / ``fp32`` (OpenVINO's INFERENCE_PRECISION_HINT). Called
    with a batch ``(N, size, size, 3)`` it returns the model's first output ``(N, ...)``;
    the batch is cast to the compiled input's element type (uint8 for the classifier,
    float32 pixels in [0, 255] for the car filter)."""

    def __init__(self, model: Any, precision: str = "fp32"):
        import numpy as np
        import openvino as ov

        core = ov.Core()
        if isinstance(model, (str, os.PathLike)):
            ov_model = core.read_model(os.fspath(model))
        elif isinstance(model, ov.Model):
            ov_model = model
        else:
            ov_model = convert(model)
        shape = ov_model.input(0).get_partial_shape()
        size = shape[1].get_length() if shape.rank.get_length() == 4 and shape[1].is_static else None
        self.input_shape = (None, size, size, 3)
        self.precision = precision
        self.compiled = core.compile_model(
            ov_model, "CPU",
            {"PERFORMANCE_HINT": "THROUGHPUT", "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32"},
        )
        self.dtype = np.dtype(self.compiled.input(0).get_element_type().to_dtype())
        self.requests = max(1, int(self.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
        self._queue = ov.AsyncInferQueue(self.compiled, self.requests)
        self._out: dict[int, Any] = {}
        self._queue.set_callback(self._done)
        self._lock = threading.Lock()

    def _done(self, request: Any, index: int) -> None:
        self._out[index] = request.get_output_tensor(0).data.copy()

    def __call__(self, x: Any) -> Any:
        import numpy as np

        x = np.ascontiguousarray(np.asarray(x).astype(self.dtype, copy=False))
        if len(x) == 0:
            out = self.compiled.output(0).get_partial_shape()
            width = out[1].get_length() if out.rank.get_length() > 1 and out[1].is_static else 1
            return np.zeros((0, width), np.float32)
        parts = np.array_split(x, min(self.requests, len(x)))
        with self._lock:
            self._out.clear()
            for i, part in enumerate(parts):
                self._queue.start_async({0: part}, i)
            self._queue.wait_all()
            return np.concatenate([self._out[i] for i in range(len(parts))])
