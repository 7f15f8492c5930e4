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
  Python scalar, the batch and other host data (a loss's shape) from pageable memory,
  which torch follows with a wait for the stream.

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

:func:`direct_forward` (torch; :func:`accelerate` applies it last) runs the model's graph
by calling each leaf layer's ``call`` directly, with the arguments Keras' graph walk would
give it, instead of through ``Layer.__call__`` at every node, which costs ~0.1 ms of
Python a layer (345 layers in EfficientNetB1, every step). Outputs, gradients and moving
statistics are bit for bit Keras' graph walk's (tested, float32 and mixed bf16).

:func:`fast_fit` (around ``fit``) removes most of the torch step's waits: Keras' seeded
random ops draw from torch's own generator of the device (seeded by
``keras.utils.set_random_seed``: as random, but a given seed no longer gives the numbers
it gives without it), and Python scalars become device tensors by a fill kernel.

Figures (``bench/train.py``): EfficientNetB1, 240 px, bf16 on one H100, torch: 612 →
961 img/s at batch 256 (host syncs a step 68 → 7 with :func:`fast_fit`), 1,652 img/s at
batch 512. The torch step is then bound by Keras' Python overhead per layer (the GPU is
busy ~100 ms of a ~300 ms step), so larger batches help. Of the 7 syncs left, 5 were
then traced on a CPU (``tests/test_fast_layers.py`` audits a recipe-compiled step; the
other 2 may be CUDA-only) and removed: the batch's two uploads and the loss's shape
(:func:`_upload`), the
augmentation's constant matrix and its checked inverse (:mod:`models.augment`), and,
outside the bench, Keras' warmup ``CosineDecay`` (:mod:`models.schedules`); not measured on
a GPU yet; JAX (XLA, no fast path needed)
ran the same model at 4,482 img/s. :func:`direct_forward` came after those GPU runs: on
2 CPU cores, where an EfficientNetB1 step of 2 images at 32 px is nearly all host
overhead, it took the torch step (bf16) from 150–167 ms to 115–122 ms (Keras' own
layers: 168–186 ms); on a GPU it is not measured yet. MobileNetV2 α 0.35 at 96 px,
fp32, on 2 CPU cores: TensorFlow 1.6× (the step 88 → 56 ms in the profiler), torch 2.6×.

:class:`CudaGraphStep` (``train.cuda_graphs``, off by default; torch on CUDA) goes
further: with no sync left in the step, the whole step is captured once as a CUDA graph
and replayed per batch, so no Keras Python runs per step at all (gpu tests check it
trains as the eager step; not measured on a GPU yet).

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


def accelerate(model: Any, forward: bool = True) -> int:
    """Give the layers of ``model`` (nested models included) that have a fused path on
    this backend that path (see the module doc), and on torch (``forward``) run the
    model's graph by direct calls (:func:`direct_forward`); returns how many layers. A
    no-op (0) on JAX (XLA fuses) and for layers already done."""
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
    if backend == "torch" and forward:
        direct_forward(model)  # after the layers: it calls each layer's (fast) call
    return done


def _graph_of(layer: Any) -> Any:
    """The functional graph a nested model runs (a ``Sequential``'s is built inside it)."""
    from keras.src.models.functional import Functional
    from keras.src.models.sequential import Sequential

    if isinstance(layer, Sequential):
        return getattr(layer, "_functional", None)
    return layer if isinstance(layer, Functional) else None


def _forward_plan(model: Any) -> tuple[list[tuple[Any, Any, int, Any]], int, int] | None:
    """The leaf-layer calls of a one-input, one-output functional ``model`` in Keras'
    order, nested models expanded: ``[(layer, input id | [ids], output id, training
    recorded at build)]``, the model input's id and its output's id; ``None`` where
    Keras' own path is needed (several inputs or outputs, masks, activity regularizers,
    other arguments)."""
    keras = import_keras()
    graph = _graph_of(model)
    if graph is None or len(graph.inputs) != 1 or len(graph.outputs) != 1:
        return None
    steps: list[tuple[Any, Any, int, Any]] = []

    def expand(fn: Any, input_id: int, default_training: Any) -> int | None:
        alias = {id(fn.inputs[0]): input_id}

        def ref(t: Any) -> int:
            return alias.get(id(t), id(t))

        for depth in sorted(fn._nodes_by_depth, reverse=True):
            for node in fn._nodes_by_depth[depth]:
                if not node.operation or node.is_input:
                    continue
                op, args, kwargs = node.operation, node.arguments.args, dict(node.arguments.kwargs)
                if kwargs.pop("mask", None) is not None or len(args) != 1 or len(node.outputs) != 1:
                    return None
                training = kwargs.pop("training", None)
                training = default_training if training is None else training
                if kwargs:
                    return None
                arg = args[0]
                inner = _graph_of(op)
                if inner is not None:
                    if (not isinstance(arg, keras.KerasTensor) or len(inner.inputs) != 1
                            or len(inner.outputs) != 1):
                        return None
                    out = expand(inner, ref(arg), training)
                    if out is None:
                        return None
                    alias[id(node.outputs[0])] = out
                    continue
                if (isinstance(op, (keras.layers.Masking, keras.layers.Embedding)) or getattr(op, "activity_regularizer", None)
                        or not isinstance(op, keras.layers.Layer)):
                    return None
                if isinstance(arg, keras.KerasTensor):
                    spec: Any = ref(arg)
                elif isinstance(arg, (list, tuple)) and arg and all(isinstance(t, keras.KerasTensor) for t in arg):
                    spec = [ref(t) for t in arg]
                else:
                    return None
                steps.append((op, spec, id(node.outputs[0]), training))
        return ref(fn.outputs[0])

    input_id = id(graph.inputs[0])
    out = expand(graph, input_id, None)
    return None if out is None else (steps, input_id, out)


def direct_forward(model: Any) -> int:
    """Run ``model``'s graph (torch backend) by calling each leaf layer's ``call``
    directly, in Keras' order, instead of through ``Layer.__call__`` at every node (input
    conversion, call spec, training and mask resolution, scopes: ~0.1 ms of Python a
    layer, for 345 layers in EfficientNetB1, per step). The same arguments reach each
    ``call``: the training flag as Keras resolves it (the caller's, else what the node
    recorded) and each layer's autocast dtype under a mixed policy. Symbolic calls
    (building, shape inference) keep Keras' path. Returns the leaf calls planned (0:
    the model needs Keras' own path, or it is done already)."""
    from keras.src import backend

    if not _torch_backend() or getattr(model, MARK, False):
        return 0
    planned = _forward_plan(model)
    if planned is None:
        return 0
    steps, input_id, out_id = planned
    prepared = []
    for layer, spec, output_id, default in steps:
        mixed = (layer.autocast and backend.is_float_dtype(layer.compute_dtype)
                 and layer.compute_dtype != layer.variable_dtype)
        prepared.append((layer.call, bool(layer._call_has_training_arg), spec, output_id, default,
                         backend.AutocastScope(layer.compute_dtype if mixed else None)))
    keras = import_keras()
    keras_call = model.call

    def call(inputs: Any, training: Any = None, mask: Any = None, **kwargs: Any) -> Any:
        if (mask is not None or kwargs or isinstance(inputs, keras.KerasTensor)
                or getattr(getattr(inputs, "device", None), "type", "meta") == "meta"):
            return keras_call(inputs, training=training, mask=mask, **kwargs)
        values = {input_id: inputs}
        for fn, takes_training, spec, output_id, default, scope in prepared:
            x = values[spec] if type(spec) is int else [values[i] for i in spec]
            with scope:
                values[output_id] = fn(x, training=default if training is None else training) \
                    if takes_training else fn(x)
        return values[out_id]

    model.call = call
    object.__setattr__(model, MARK, True)
    return len(prepared)


def _no_generator(seed: Any) -> None:
    return None  # torch's default generator of the device: no host round trip


def _host_numbers(x: Any) -> bool:
    """A flat list or tuple of Python or NumPy numbers (a shape, a constant vector)."""
    import numpy as np

    return isinstance(x, (list, tuple)) and bool(x) and all(
        isinstance(v, (bool, int, float, np.bool_, np.number)) for v in x)


def _on_cuda(device: Any) -> bool:
    return str(device).startswith("cuda")


#: the most elements a host tensor may have to be rebuilt on the device by fills while a
#: CUDA graph is captured (a shape, a constant vector; a batch is uploaded before)
CAPTURED_HOST_ELEMENTS = 64


def _upload(t: Any, device: Any) -> Any:
    """A CPU tensor to ``device`` from page-locked memory, without waiting: a pageable
    copy (``non_blocking=False``) first waits for everything queued on the stream. The
    staging block goes back to torch's pinned pool once the copy has run. While a CUDA
    graph is captured (:class:`CudaGraphStep`) a copy would be replayed from a host buffer
    freed since, so a small tensor (a loss's shape) is rebuilt on the device by fill
    kernels, constants of the graph; a larger one is an error (the capture falls back)."""
    import torch

    if torch.cuda.is_current_stream_capturing():
        if t.numel() > CAPTURED_HOST_ELEMENTS:
            raise RuntimeError(f"host data of shape {tuple(t.shape)} inside a captured training step")
        flat = [torch.full((), v, dtype=t.dtype, device=device) for v in t.reshape(-1).tolist()]
        return (torch.stack(flat) if flat else torch.empty(0, dtype=t.dtype, device=device)).reshape(t.shape)
    if not t.is_pinned():
        try:
            t = t.pin_memory()
        except RuntimeError:  # no page-locked memory to be had: the waiting copy
            return t.to(device)
    return t.to(device, non_blocking=True)


def pinned(batch: Any) -> Any:
    """A batch (a tuple of NumPy arrays) as page-locked torch CPU tensors: for the input's
    background thread when training on a GPU (:func:`torch_on_cuda`), so that the step's
    upload (:func:`fast_fit`) neither copies on the host first nor waits."""
    import torch

    try:
        return tuple(torch.from_numpy(v).pin_memory() for v in batch)
    except RuntimeError:  # no page-locked memory to be had: as it came (uploaded waiting)
        return batch


def torch_on_cuda() -> bool:
    """The torch backend with a CUDA device: where :func:`pinned` batches and
    :class:`CudaGraphStep` apply."""
    if not _torch_backend():
        return False
    import torch

    return bool(torch.cuda.is_available())


def _filling(convert: Any) -> Any:
    """``convert_to_tensor`` that makes a Python scalar with ``torch.full`` on the device
    (a fill kernel) instead of ``torch.as_tensor`` (a copy from pageable host memory,
    which waits for the device's queue), and on a CUDA device uploads host data (NumPy
    arrays, lists of numbers, CPU tensors: the batch, a loss's shape) from page-locked
    memory without waiting (:func:`_upload`); the same dtype rules (Keras' own
    conversion on the CPU), anything else unchanged."""
    import numpy as np
    import torch
    from keras.src.backend.config import floatx
    from keras.src.backend.torch.core import device_scope, get_device, to_torch_dtype

    def convert_to_tensor(x: Any, dtype: Any = None, sparse: Any = None, ragged: Any = None) -> Any:
        if sparse or ragged:
            return convert(x, dtype=dtype, sparse=sparse, ragged=ragged)
        device = get_device()
        if device == "meta":
            return convert(x, dtype=dtype)
        if isinstance(x, (bool, int, float)):
            if dtype is not None:
                dt = to_torch_dtype(dtype)
            elif isinstance(x, bool):
                dt = torch.bool
            elif isinstance(x, int):
                dt = torch.int64 if x < -(2**31) or x >= 2**31 else torch.int32
            else:
                dt = to_torch_dtype(floatx())
            return torch.full((), x, dtype=dt, device=device)
        if _on_cuda(device):
            if type(x) is torch.Tensor and x.device.type == "cpu":
                x = _upload(x, device)
            elif isinstance(x, (np.ndarray, np.generic)) or _host_numbers(x):
                with device_scope("cpu"):
                    return _upload(convert(x, dtype=dtype), device)
        return convert(x, dtype=dtype)

    return convert_to_tensor


def host_syncs(run: Any, commonest: int = 3) -> tuple[float, list[str]]:
    """Host-device synchronisations a training step on CUDA, and the commonest call
    sites: ``run(steps)`` (e.g. a ``fit`` of that many steps) is called for 2 and 6 steps
    under ``torch.cuda.set_sync_debug_mode("warn")``, which warns at each one; the
    difference over 4 leaves out what happens once a ``fit``."""
    import collections
    import warnings
    from pathlib import Path

    import torch

    counts = []
    sites: collections.Counter = collections.Counter()
    for steps in (2, 6):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                run(steps)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        hits = [w for w in caught if "synchroniz" in str(w.message)]
        counts.append(len(hits))
        if steps == 6:
            sites.update(f"{Path(w.filename).parent.name}/{Path(w.filename).name}:{w.lineno}" for w in hits)
    return (counts[1] - counts[0]) / 4, [f"{k} x{v}" for k, v in sites.most_common(commonest)]


class CudaGraphStep:
    """``model.train_function`` as one CUDA graph (torch): the whole step (forward, loss,
    backward, optimizer update, metrics) is captured once and replayed for every batch
    of the same shapes, so the host's per-step work is copying the batch into the graph's
    input buffers and one ``replay``: none of Keras' Python per layer, per gradient and per
    kernel launch.

    - The first ``warmup`` steps run eagerly on a side stream (cuDNN algorithm choice,
      optimizer and metric variables built), as torch requires before a capture; the next
      step is captured with its batch in static device buffers and then replayed.
    - A batch of other shapes (an epoch's partial last batch) runs eagerly; so does every
      step if the capture fails (an op that synchronises or copies host data inside the
      step): one line says why, and training goes on at eager speed.
    - What changes from step to step stays on the device: the learning rate follows the
      optimizer's ``iterations``, random draws come from torch's generator (which a graph
      advances on each replay; use inside :func:`fast_fit`), metrics and BatchNorm
      statistics are updated in place.

    Use around ``fit`` through :func:`cuda_graph_steps`; Keras' ``compile`` drops it (a new
    optimizer: a new graph). Not for fp16 (its loss scaling branches on the host)."""

    def __init__(self, model: Any, step: Any, warmup: int = 3, log: Any = None):
        self.model, self.step, self.warmup, self.log = model, step, warmup, log or print
        self.calls = 0
        self.replays = 0
        self.graph: Any = None
        self.failed = False
        self.signature: Any = None
        self.inputs: list[Any] = []
        self.outputs: Any = None
        self.side: Any = None

    @staticmethod
    def _signature(tensors: list[Any]) -> tuple:
        return tuple((tuple(t.shape), t.dtype) for t in tensors)

    def _device_batch(self, data: Any) -> tuple[Any, list[Any]]:
        from keras.src import tree
        from keras.src.backend.torch.core import convert_to_tensor

        batch = tree.map_structure(lambda v: None if v is None else convert_to_tensor(v), data)
        return batch, [t for t in tree.flatten(batch) if t is not None]

    def __call__(self, data: Any) -> Any:
        import torch
        from keras.src import tree

        self.calls += 1
        batch, tensors = self._device_batch(data)
        if self.graph is not None and self._signature(tensors) == self.signature:
            for dst, src in zip(self.inputs, tensors):
                dst.copy_(src, non_blocking=True)
            self.graph.replay()
            self.replays += 1
            return self.outputs
        if self.failed or self.graph is not None:
            return self.step(batch)
        if self.calls <= self.warmup:
            if self.side is None:
                self.side = torch.cuda.Stream()
            self.side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.side):
                logs = self.step(batch)
            torch.cuda.current_stream().wait_stream(self.side)
            return logs
        self.inputs = [t.clone() for t in tensors]
        it = iter(self.inputs)
        static = tree.map_structure(lambda v: None if v is None else next(it), batch)
        self.model.zero_grad()  # the backward's gradients are allocated in the graph's pool
        graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: the input's background thread may pin memory meanwhile
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                self.outputs = self.step(static)
        except Exception as exc:  # noqa: BLE001 - any op that cannot be captured: stay eager
            self.failed, self.inputs, self.outputs = True, [], None
            self.log(f"CUDA graph capture of the training step failed, training eagerly: "
                     f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            torch.cuda.synchronize()
            return self.step(batch)
        self.graph, self.signature = graph, self._signature(tensors)
        graph.replay()  # the capture only recorded this step: run it
        self.replays += 1
        return self.outputs


@contextlib.contextmanager
def cuda_graph_steps(model: Any, on: bool = True, warmup: int = 3, log: Any = None) -> Iterator[Any]:
    """While open (around ``fit``), ``model``'s training step is a :class:`CudaGraphStep`
    where it can be: torch backend, a CUDA device, ``on``, and not under fp16 loss
    scaling. Yields that step (``.replays``: steps run by the graph), or None; Keras' own
    train function is put back after."""
    if not (on and torch_on_cuda() and import_keras().config.dtype_policy().name != "mixed_float16"):
        yield None
        return
    model.make_train_function()
    keras_step = model.train_function
    model.train_function = graphed = CudaGraphStep(model, keras_step, warmup, log)
    try:
        yield graphed
    finally:
        model.train_function = keras_step


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
      with a wait for the stream;
    - host data (the batch, a loss's shape) goes to a CUDA device from page-locked
      memory with ``non_blocking=True`` (torch's pageable copy waits for the stream).

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
