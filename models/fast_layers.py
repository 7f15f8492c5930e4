"""Fast paths for the layers Keras 3 runs slowly on its torch and TensorFlow backends:
the same layers and the same arithmetic, in fewer kernels, and without a host sync per
random draw or scalar on torch.

Why (Keras 3.15):

- **BatchNormalization is about ten kernels on both backends.** It casts a bf16 input to
  float32, computes the batch moments with separate reductions, normalises in four
  elementwise ops and casts back, and the backward pass runs as many again. (Keras 2
  called TensorFlow's fused kernel; the seeds trained with it.)
- **Convolutions copy their input twice on torch.** ``keras.src.backend.torch.nn.conv``
  makes the NHWC input contiguous NCHW (a copy), then converts it back to channels-last
  memory (a second copy) before ``conv2d``; the backward pass does the same again.
- **The torch step waits for the GPU ~70 times.** ``torch_seed_generator`` seeds a
  ``torch.Generator`` through ``int()`` of the seed state, which lives on the GPU (one
  wait per dropout layer and augmentation draw), and ``convert_to_tensor`` copies every
  Python scalar from pageable memory, which CUDA precedes with a wait for the stream.

What :func:`accelerate` does, per layer instance (class, config and weights untouched, so
a saved model is the same file and loads anywhere, without this module):

- ``BatchNormalization`` (4-D channels last, no mask, no renorm) → one fused kernel:
  ``torch.nn.functional.batch_norm`` on a channels-first *view* (torch), TensorFlow's
  ``FusedBatchNormV3`` (TensorFlow). Both take a bf16 input with float32 statistics and
  accumulate in float32, as Keras does. One difference: they update the moving variance
  with the unbiased batch variance (× n/(n−1), n = batch × height × width: 1.00006 for a
  batch of 256 at 8×8 px) where Keras uses the biased one.
- ``Conv2D`` 1x1 at stride 1 (one group, channels last), on TensorFlow without a GPU →
  one ``matmul`` over the pixels. oneDNN's 1x1 convolution is the slowest op of the CPU
  training step (MobileNetV2 α 0.35, 96 px, batch 32: 41 ms a step of 88, 33 ms of it
  backward); the same products as matmuls take 13.5 ms. (GPUs are left to cuDNN.)
- ``Conv2D`` (one group) and ``DepthwiseConv2D``, channels last, on torch → one
  ``torch.nn.functional.conv2d`` on channels-first views of the NHWC tensors (already
  channels-last in memory: no copy), the bias fused, "same" padding as Keras computes it.

:func:`fast_fit` (around ``fit``) removes most of the torch step's waits: Keras' seeded
random ops draw from torch's own generator of the device (seeded by
``keras.utils.set_random_seed``: as random, but a given seed no longer gives the numbers
it gives without it), and Python scalars become device tensors by a fill kernel.

Figures (``bench/train.py``): EfficientNetB1, 240 px, bf16 on one H100, torch: 612 →
961 img/s at batch 256 (host syncs a step 68 → 7 with :func:`fast_fit`), 1,652 img/s at
batch 512. The torch step is then bound by Keras' Python overhead per layer (the GPU is
busy ~100 ms of a ~300 ms step), so larger batches help; JAX (XLA, no fast path needed)
ran the same model at 4,482 img/s. MobileNetV2 α 0.35 at 96 px, fp32, on 2 CPU cores:
TensorFlow 1.6× (the step 88 → 56 ms in the profiler), torch 2.6×.

JAX needs none of it (XLA fuses): :func:`accelerate` returns 0 there.
``train.fast_layers`` (on by default) turns both on for ``python -m flows.train``;
``tests/test_fast_layers.py`` checks each fast path against Keras' own layer (outputs,
gradients, moving statistics) on both backends.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from carflow.frameworks import import_keras

#: attribute set on a layer whose ``call`` :func:`accelerate` replaced
MARK = "_carflow_fast_layers"


def _torch_backend() -> bool:
    return import_keras().backend.backend() == "torch"


def same_padding(length: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """(before, after) padding of one spatial dimension for Keras' ``padding="same"``
    (the torch backend's rule: ``k - 1`` in total at stride 1, TensorFlow's otherwise;
    the odd pixel goes after)."""
    effective = (kernel - 1) * dilation + 1
    if stride == 1:
        total = effective - 1
    else:
        out = (length + stride - 1) // stride
        total = max(0, (out - 1) * stride + effective - length)
    return total // 2, total - total // 2


def _conv_call(layer: Any, depthwise: bool) -> Any:
    import torch
    import torch.nn.functional as F

    def call(inputs: Any) -> Any:
        if inputs.ndim != 4 or inputs.device.type == "meta":
            return type(layer).call(layer, inputs)
        kernel = layer.kernel.value  # the compute dtype under a mixed policy (autocast scope)
        if depthwise:  # (kh, kw, in, mult) → (in · mult, 1, kh, kw)
            kh, kw, cin, mult = kernel.shape
            weight = kernel.reshape(kh, kw, 1, cin * mult).permute(3, 2, 0, 1)
            groups = cin
        else:  # (kh, kw, in, out) → (out, in, kh, kw)
            weight = kernel.permute(3, 2, 0, 1)
            groups = 1
        weight = weight.contiguous(memory_format=torch.channels_last)
        x = inputs.permute(0, 3, 1, 2)  # NCHW view of NHWC memory: channels-last, no copy
        if layer.padding == "same":
            (t, b), (left, right) = (same_padding(int(x.shape[2 + i]), int(weight.shape[2 + i]), layer.strides[i],
                                                  layer.dilation_rate[i]) for i in range(2))
            if t == b and left == right:
                padding: Any = (t, left)
            else:
                x = F.pad(x, (left, right, t, b))
                padding = 0
        else:
            padding = 0
        bias = layer.bias.value if layer.use_bias else None
        out = F.conv2d(x, weight, bias, tuple(layer.strides), padding, tuple(layer.dilation_rate), groups)
        out = out.permute(0, 2, 3, 1)
        return layer.activation(out) if layer.activation is not None else out

    return call


def _torch_bn_call(layer: Any) -> Any:
    import torch.nn.functional as F

    def call(inputs: Any, training: Any = None, mask: Any = None) -> Any:
        ndim = inputs.ndim
        if (mask is not None or inputs.device.type == "meta" or ndim < 2
                or layer.axis not in (-1, ndim - 1)):
            return type(layer).call(layer, inputs, training=training, mask=mask)
        x = inputs.permute(0, ndim - 1, *range(1, ndim - 1)) if ndim > 2 else inputs
        out = F.batch_norm(
            x, layer.moving_mean.value, layer.moving_variance.value,
            layer.gamma.value if layer.scale else None, layer.beta.value if layer.center else None,
            training=bool(training) and layer.trainable, momentum=1.0 - float(layer.momentum),
            eps=float(layer.epsilon))
        if ndim > 2:
            out = out.permute(0, *range(2, ndim), 1)
        return out.to(inputs.dtype)

    return call


def _tf_bn_call(layer: Any) -> Any:
    from carflow.frameworks import import_tensorflow

    tf = import_tensorflow()

    def call(inputs: Any, training: Any = None, mask: Any = None) -> Any:
        if mask is not None or inputs.shape.rank != 4 or layer.axis not in (-1, 3):
            return type(layer).call(layer, inputs, training=training, mask=mask)
        train = bool(training) and layer.trainable
        channels = int(inputs.shape[-1])
        out, mean, variance = tf.compat.v1.nn.fused_batch_norm(
            inputs, layer.gamma if layer.scale else tf.ones([channels]),
            layer.beta if layer.center else tf.zeros([channels]),
            mean=layer.moving_mean, variance=layer.moving_variance, epsilon=float(layer.epsilon),
            is_training=train, data_format="NHWC",
            exponential_avg_factor=(1.0 - float(layer.momentum)) if train else 1.0)
        if train:  # the op returns the moving statistics updated
            layer.moving_mean.assign(mean)
            layer.moving_variance.assign(variance)
        return out

    return call


def _tf_pointwise_call(layer: Any) -> Any:
    from carflow.frameworks import import_tensorflow

    tf = import_tensorflow()

    def call(inputs: Any) -> Any:
        if inputs.shape.rank != 4:
            return type(layer).call(layer, inputs)
        kernel = tf.cast(layer.kernel, inputs.dtype)  # (1, 1, in, out)
        cin, cout = int(kernel.shape[2]), int(kernel.shape[3])
        rows = tf.matmul(tf.reshape(inputs, [-1, cin]), tf.reshape(kernel, [cin, cout]))
        if layer.use_bias:
            rows = tf.nn.bias_add(rows, tf.cast(layer.bias, rows.dtype))
        out = tf.reshape(rows, tf.concat([tf.shape(inputs)[:3], [cout]], 0))
        return layer.activation(out) if layer.activation is not None else out

    return call


def _tf_on_cpu() -> bool:
    from carflow.frameworks import import_tensorflow

    return not import_tensorflow().config.list_logical_devices("GPU")


def accelerate(model: Any) -> int:
    """Give the layers of ``model`` (nested models included) that have a fused path on
    this backend that path (see the module doc); returns how many. A no-op (0) on JAX
    (XLA fuses) and for layers already done."""
    keras = import_keras()
    backend = keras.backend.backend()
    if backend not in ("torch", "tensorflow"):
        return 0
    done = 0
    tf_cpu = backend == "tensorflow" and _tf_on_cpu()
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if getattr(layer, MARK, False) or getattr(layer, "quantization_mode", None) \
                or getattr(layer, "lora_enabled", False):
            continue
        kind = type(layer)
        if kind is keras.layers.BatchNormalization:
            if getattr(layer, "renorm", False) or getattr(layer, "synchronized", False):
                continue
            layer.call = _torch_bn_call(layer) if backend == "torch" else _tf_bn_call(layer)
        elif kind in (keras.layers.Conv2D, keras.layers.DepthwiseConv2D) and backend == "torch":
            if layer.data_format != "channels_last" or getattr(layer, "groups", 1) != 1:
                continue
            layer.call = _conv_call(layer, kind is keras.layers.DepthwiseConv2D)
        elif kind is keras.layers.Conv2D and tf_cpu:
            if (layer.data_format != "channels_last" or getattr(layer, "groups", 1) != 1
                    or tuple(layer.kernel_size) != (1, 1) or tuple(layer.strides) != (1, 1)):
                continue
            layer.call = _tf_pointwise_call(layer)
        else:
            continue
        object.__setattr__(layer, MARK, True)
        done += 1
    return done


def _no_generator(seed: Any) -> None:
    return None  # torch's default generator of the device: no host round trip


def _filling(convert: Any) -> Any:
    """``convert_to_tensor`` that makes a Python scalar with ``torch.full`` on the device
    (a fill kernel) instead of ``torch.as_tensor`` (a copy from pageable host memory,
    which waits for the device's queue); the same dtype rules, anything else unchanged."""
    import torch
    from keras.src.backend.config import floatx
    from keras.src.backend.torch.core import get_device, to_torch_dtype

    def convert_to_tensor(x: Any, dtype: Any = None, sparse: Any = None, ragged: Any = None) -> Any:
        if isinstance(x, (bool, int, float)) and not sparse and not ragged:
            device = get_device()
            if device != "meta":
                if dtype is not None:
                    dt = to_torch_dtype(dtype)
                elif isinstance(x, bool):
                    dt = torch.bool
                elif isinstance(x, int):
                    dt = torch.int64 if x < -(2**31) or x >= 2**31 else torch.int32
                else:
                    dt = to_torch_dtype(floatx())
                return torch.full((), x, dtype=dt, device=device)
        return convert(x, dtype=dtype, sparse=sparse, ragged=ragged)

    return convert_to_tensor


def _swap(name: str, old: Any, new: Any) -> list[tuple[Any, str, Any]]:
    """Point every loaded ``keras`` module's ``name`` that is ``old`` at ``new`` (modules
    bind Keras' backend functions at import); returns what to put back."""
    import sys

    undo = []
    for module_name, module in list(sys.modules.items()):
        if module is not None and module_name.startswith("keras") and getattr(module, name, None) is old:
            setattr(module, name, new)
            undo.append((module, name, old))
    return undo


@contextlib.contextmanager
def fast_fit() -> Iterator[bool]:
    """While open, Keras' torch backend does not wait for the device where it need not:

    - seeded random ops draw from torch's default generator of the device, not from a
      ``torch.Generator`` seeded through ``int()`` of the seed state on the device;
    - Python scalars (``x * 0.5``, ``1.0 - rate``, the optimizer's constants) become device
      tensors by a fill kernel, not a copy from pageable memory, which CUDA precedes
      with a wait for the stream.

    Yields whether it did anything (False on other backends)."""
    if not _torch_backend():
        yield False
        return
    from keras.src.backend.torch import core as torch_core
    from keras.src.backend.torch import random as torch_random

    undo = _swap("torch_seed_generator", torch_random.torch_seed_generator, _no_generator)
    convert = torch_core.convert_to_tensor
    undo += _swap("convert_to_tensor", convert, _filling(convert))
    try:
        yield True
    finally:
        for module, name, value in undo:
            setattr(module, name, value)
