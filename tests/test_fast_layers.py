"""models.fast_layers: each fast path against Keras' own layer, on TensorFlow (this
process) and on torch (a subprocess: one Keras backend per process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from carflow.frameworks import import_keras
from models.fast_layers import MARK, accelerate, fast_fit, same_padding

ROOT = Path(__file__).resolve().parents[1]

TORCH_CHECKS = r"""
import json, numpy as np, torch, keras
from models.fast_layers import MARK, accelerate, fast_fit
from models.classifier import build_classifier
from keras.src.backend.torch import core, random as trandom

rng = np.random.default_rng(0)
report = {}

def pair(cls, **kw):
    a, b = cls(**kw), cls(**kw)
    return a, b

cases = {
    "bn": (keras.layers.BatchNormalization, dict(momentum=0.9), (4, 15, 16, 6)),
    "conv_same_s2": (keras.layers.Conv2D, dict(filters=8, kernel_size=3, strides=2, padding="same"), (4, 15, 16, 6)),
    "conv_same_even": (keras.layers.Conv2D, dict(filters=5, kernel_size=4, padding="same", activation="swish"), (2, 9, 10, 3)),
    "conv_valid_1x1": (keras.layers.Conv2D, dict(filters=4, kernel_size=1, use_bias=False), (2, 7, 7, 6)),
    "depthwise_s2": (keras.layers.DepthwiseConv2D, dict(kernel_size=5, strides=2, padding="same", depth_multiplier=2), (4, 16, 15, 6)),
    "depthwise_dilated": (keras.layers.DepthwiseConv2D, dict(kernel_size=3, padding="same", dilation_rate=2), (2, 12, 12, 4)),
}
for name, (cls, kw, shape) in cases.items():
    a, b = pair(cls, **kw)
    x = torch.tensor(rng.normal(2, 3, shape).astype(np.float32))
    a.build(x.shape); b.build(x.shape)
    for va, vb in zip(a.weights, b.weights):
        value = torch.tensor(rng.normal(0.5, 0.3, tuple(va.shape)).astype(np.float32))
        if "variance" in va.path:
            value = value.abs() + 0.5
        va.assign(value); vb.assign(value)
    assert accelerate(keras.Sequential([b])) == 1 and getattr(b, MARK)
    out = {}
    for training in (False, True):
        xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        oa, ob = a(xa, training=training), b(xb, training=training)
        g = torch.tensor(rng.normal(size=tuple(oa.shape)).astype(np.float32))
        (oa * g).sum().backward(); (ob * g).sum().backward()
        wa = [w.value.grad for w in a.trainable_weights]; wb = [w.value.grad for w in b.trainable_weights]
        out[str(training)] = {
            "shape": [list(oa.shape), list(ob.shape)],
            "out": float((oa - ob).abs().max()), "scale": float(oa.abs().max()),
            "grad_x": float((xa.grad - xb.grad).abs().max()),
            "grad_w": max(float((p - q).abs().max()) for p, q in zip(wa, wb)),
        }
        for w in a.trainable_weights + b.trainable_weights:
            w.value.grad = None
    if name == "bn":
        n = shape[0] * shape[1] * shape[2]
        out["moving_mean"] = float((a.moving_mean.value - b.moving_mean.value).abs().max())
        # torch updates with the unbiased batch variance (x n/(n-1) on the batch's share)
        va_ = a.moving_variance.value; vb_ = b.moving_variance.value
        out["moving_var_rel"] = float(((vb_ - va_) / va_).abs().max())
        out["n"] = n
    report[name] = out

# the classifier: every BN and conv layer of the base gets a fast path, inference unchanged,
# and the saved file loads as a plain Keras model (no trace of the fast path)
cfg = {"backbone": "efficientnetb1", "weights": "none", "image_size": 32, "flip": True, "rotation": 0.05,
       "contrast": 0.1}
keras.utils.set_random_seed(1)
plain = build_classifier(3, cfg)
fast = build_classifier(3, cfg); fast.set_weights(plain.get_weights())
kinds = (keras.layers.BatchNormalization, keras.layers.Conv2D, keras.layers.DepthwiseConv2D)
eligible = sum(type(l) in kinds for l in fast._flatten_layers(include_self=False, recursive=True))
report["patched"], report["eligible"] = accelerate(fast), eligible
report["again"] = accelerate(fast)
x = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
report["model_out"] = float(np.abs(keras.ops.convert_to_numpy(plain(x, training=False))
                                   - keras.ops.convert_to_numpy(fast(x, training=False))).max())
import tempfile, os
with tempfile.TemporaryDirectory() as tmp:
    fast.save(os.path.join(tmp, "m.keras"))
    from models.classifier import load_keras_model
    loaded = load_keras_model(os.path.join(tmp, "m.keras"))
    report["loaded_marked"] = any(hasattr(l, MARK) for l in loaded._flatten_layers(include_self=False, recursive=True))
    report["loaded_out"] = float(np.abs(keras.ops.convert_to_numpy(loaded(x, training=False))
                                        - keras.ops.convert_to_numpy(plain(x, training=False))).max())

# direct_forward: the same leaf calls as Keras' graph walk, so bit for bit the same
# outputs, gradients and moving statistics, in both modes and under a mixed policy
from models.fast_layers import direct_forward
det = {"backbone": "efficientnetb1", "weights": "none", "image_size": 32, "dropout": 0.0}
report["direct"] = {}
for policy in ("float32", "mixed_bfloat16"):
    keras.config.set_dtype_policy(policy)
    walk = build_classifier(3, det)
    lean = build_classifier(3, det); lean.set_weights(walk.get_weights())
    accelerate(walk, forward=False)
    leaves = [l for l in lean._flatten_layers(include_self=False, recursive=True)
              if not isinstance(l, (keras.Model, keras.layers.InputLayer))]
    accelerate(lean)
    r = {"planned_again": direct_forward(lean), "leaves": len(leaves),
         "walk_planned": direct_forward(walk) == len(leaves)}  # walk gets it last: only the count
    walk = build_classifier(3, det); walk.set_weights(lean.get_weights()); accelerate(walk, forward=False)
    for p, q in zip(walk._flatten_layers(), lean._flatten_layers()):  # the same drop-connect draws
        if getattr(p, "seed_generator", None) is not None:
            q.seed_generator.state.assign(p.seed_generator.state.value)
    for training in (False, True):
        xa = torch.tensor(rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8))
        oa, ob = walk(xa, training=training), lean(xa, training=training)
        (oa.float().square().sum()).backward(); (ob.float().square().sum()).backward()
        r[str(training)] = {
            "dtype": [str(oa.dtype), str(ob.dtype)], "out": float((oa - ob).abs().max()),
            "grad": max(float((p.value.grad - q.value.grad).abs().max())
                        for p, q in zip(walk.trainable_weights, lean.trainable_weights)),
            "stats": max(float((p.value - q.value).abs().max())
                         for p, q in zip(walk.non_trainable_weights, lean.non_trainable_weights)),
        }
        lean.zero_grad(); walk.zero_grad()
    # symbolic calls keep Keras' path
    r["symbolic"] = list(lean(keras.Input((32, 32, 3), dtype="uint8")).shape)
    report["direct"][policy] = r
keras.config.set_dtype_policy("float32")
two = keras.Input((4,)), keras.Input((4,))
report["direct_two_inputs"] = direct_forward(keras.Model(list(two), keras.layers.Add()(list(two))))

# fast_fit: scalars keep their dtype and value, random ops run, everything is put back
convert, seeder = core.convert_to_tensor, trandom.torch_seed_generator
dtypes = []
with fast_fit() as active:
    report["active"] = active
    report["swapped"] = core.convert_to_tensor is not convert and trandom.torch_seed_generator is not seeder
    for v in (1.5, 3, True, 2 ** 40):
        got, ref = keras.ops.convert_to_tensor(v), convert(v)
        dtypes.append([str(got.dtype), str(ref.dtype), float(got) == float(ref)])
    u = keras.random.uniform((1000,), seed=keras.random.SeedGenerator(3))
    report["uniform"] = [float(u.min()), float(u.max())]
    y = np.eye(3, dtype=np.float32)[rng.integers(0, 3, 8)]
    fast.compile(optimizer="adam", loss=keras.losses.CategoricalCrossentropy(from_logits=True))
    h = fast.fit(rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8), y, epochs=2, batch_size=4, verbose=0)
    report["loss"] = [float(v) for v in h.history["loss"]]
report["dtypes"] = dtypes
# host data: Keras' own dtypes and values (on a CUDA device it goes up from pinned memory)
hosted = []
with fast_fit():
    for v, dt in ((np.arange(6, dtype=np.uint8).reshape(2, 3), None), (np.arange(3, dtype=np.uint32), None),
                  (np.linspace(0, 1, 4), "float32"), ((2, 3, 5), "int32"), ([1.5, 2.5], None),
                  (torch.arange(4), "float32"), (np.float32(2.5), None)):
        got, ref = keras.ops.convert_to_tensor(v, dtype=dt), convert(v, dtype=dt)
        hosted.append([str(got.dtype), str(ref.dtype), got.tolist() == ref.tolist(), str(got.device)])
report["hosted"] = hosted

# what would make a training step wait for a GPU: a value read back (item, bool, int,
# numpy), an inverse with its error check, or host data made into a tensor anywhere but
# fast_fit's upload; counted over fits of 2 and 5 steps (the difference: per step)
from torch.overrides import TorchFunctionMode
import traceback
READS = {"item", "__bool__", "__int__", "__float__", "__index__", "tolist", "numpy", "__array__", "cpu",
         "linalg_inv", "inv", "nonzero"}
MAKES = {"tensor", "as_tensor", "from_numpy", "asarray"}
class Waits(TorchFunctionMode):
    def __init__(self):
        super().__init__(); self.sites = []
    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in READS or (name in MAKES and args and not isinstance(args[0], (torch.Tensor, bool, int, float))):
            stack = traceback.extract_stack()[:-1]
            if not any(f.name == "convert_to_tensor" and f.filename.endswith("fast_layers.py") for f in stack):
                self.sites.append(f"{name} @ {stack[-1].filename.split('/')[-1]}:{stack[-1].lineno}")
        return func(*args, **(kwargs or {}))
aug = build_classifier(3, {**cfg, "zoom": 0.1, "translation": 0.1, "dropout": 0.2}); accelerate(aug)
from carflow.settings import TrainSettings
from models.recipe import Phase, compile_for, lr_schedule
recipe = TrainSettings(label_smoothing=0.1, warmup_epochs=1)  # AdamW, warmup then cosine, accuracy
compile_for(aug, recipe, "multiclass", lr_schedule(recipe, Phase("full", 0, 3, 1e-3), 5))
xs, ys = rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8), np.eye(3, dtype=np.float32)[rng.integers(0, 3, 20)]
ws = rng.random(20).astype(np.float32)
waits = {}
with fast_fit():
    aug.fit(xs, ys, sample_weight=ws, batch_size=4, epochs=1, verbose=0)
    for steps in (2, 5):
        with Waits() as w:
            aug.fit(xs[:4 * steps], ys[:4 * steps], sample_weight=ws[:4 * steps], batch_size=4, epochs=1, verbose=0)
        waits[steps] = w.sites
report["waits_per_step"] = (len(waits[5]) - len(waits[2])) / 3
from models.fast_layers import cuda_graph_steps
step_before = aug.train_function
with cuda_graph_steps(aug) as graphed:  # no CUDA here: Keras' own step
    report["graph_on_cpu"] = [graphed is None, aug.train_function is step_before]
from models.fast_layers import pinned, torch_on_cuda
plain_batch = (xs[:2], ys[:2])
report["pinning_on_cpu"] = [torch_on_cuda(), pinned(plain_batch) is plain_batch]  # no page-locked memory: as it came
report["wait_sites"] = sorted(set(waits[5]))
report["restored"] = core.convert_to_tensor is convert and trandom.torch_seed_generator is seeder
print("REPORT " + json.dumps(report))
"""


def torch_env() -> dict:
    """The environment of a torch-backend subprocess: this checkout first on the path,
    whatever the path had (a device machine's packages installed with ``--target``)."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "KERAS_BACKEND": "torch", "PYTHONPATH": path}


def run_torch(script: str) -> dict:
    """Run ``script`` on the torch backend in a subprocess and return its ``REPORT`` line's
    JSON; skips the test where the script says ``NOCUDA``."""
    out = subprocess.run([sys.executable, "-c", script], env=torch_env(), capture_output=True, text=True,
                         timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    if "NOCUDA" in out.stdout:
        pytest.skip("no CUDA device")
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("REPORT ")][-1]
    return json.loads(line[len("REPORT "):])


@pytest.fixture(scope="module")
def torch_report() -> dict:
    return run_torch(TORCH_CHECKS)


def test_torch_layers_compute_what_keras_computes(torch_report: dict) -> None:
    """Each fast path gives Keras' outputs, input gradients and weight gradients, in
    inference and training mode (float32: the same kernels, to rounding)."""
    for name in ("bn", "conv_same_s2", "conv_same_even", "conv_valid_1x1", "depthwise_s2", "depthwise_dilated"):
        for mode in ("False", "True"):
            r = torch_report[name][mode]
            assert r["shape"][0] == r["shape"][1], (name, r)
            assert r["scale"] > 0.1, (name, r)  # not a trivially zero output
            assert r["out"] <= 1e-4 * max(1.0, r["scale"]), (name, mode, r)
            assert r["grad_x"] <= 1e-4 and r["grad_w"] <= 1e-3, (name, mode, r)


def test_torch_batchnorm_moving_statistics(torch_report: dict) -> None:
    """Same moving mean; the moving variance differs only by torch's unbiased batch
    variance (× n/(n-1) on the batch's share, momentum 0.9)."""
    bn = torch_report["bn"]
    assert bn["moving_mean"] < 1e-5
    assert 0 < bn["moving_var_rel"] <= 1.0 / (bn["n"] - 1) + 1e-6


def test_classifier_is_accelerated_and_saves_as_plain_keras(torch_report: dict) -> None:
    assert torch_report["patched"] == torch_report["eligible"] > 50  # EfficientNetB1: every BN and conv
    assert torch_report["again"] == 0
    assert torch_report["model_out"] < 1e-4
    assert not torch_report["loaded_marked"] and torch_report["loaded_out"] < 1e-4


def test_direct_forward_is_keras_graph_walk_bit_for_bit(torch_report: dict) -> None:
    """direct_forward calls every leaf layer of the model (nested base and augmentation
    included) with the arguments Keras' graph walk gives it: identical outputs, weight
    gradients and moving statistics, inference and training, float32 and mixed bf16;
    symbolic calls and unsupported models keep Keras' path."""
    for policy, r in torch_report["direct"].items():
        assert r["walk_planned"] and r["leaves"] > 300  # EfficientNetB1's layers, each planned
        assert r["planned_again"] == 0
        for training in ("False", "True"):
            got = r[training]
            assert got["dtype"][0] == got["dtype"][1] == "torch.float32"  # the logits layer's policy
            assert got["out"] == 0 and got["grad"] == 0 and got["stats"] == 0, (policy, training, got)
        assert r["symbolic"] == [None, 3]
    assert torch_report["direct_two_inputs"] == 0


def test_fast_fit_scalars_random_and_restore(torch_report: dict) -> None:
    assert torch_report["active"] and torch_report["swapped"] and torch_report["restored"]
    for got, ref, same in torch_report["dtypes"]:
        assert got == ref and same
    lo, hi = torch_report["uniform"]
    assert 0 <= lo < 0.01 and 0.99 < hi < 1
    assert len(torch_report["loss"]) == 2 and all(np.isfinite(torch_report["loss"]))
    for got, ref, same, device in torch_report["hosted"]:
        assert got == ref and same and device == "cpu"


def test_torch_training_step_has_nothing_that_waits_for_the_device(torch_report: dict) -> None:
    """No read-back, no checked inverse and no host-data tensor outside fast_fit's upload
    in a training step as flows.train compiles it (AdamW, warmup + cosine schedule,
    accuracy; augmentation, dropout, label smoothing, sample weights): on a GPU each would
    stall the host until the device catches up (the gpu test counts those)."""
    assert torch_report["waits_per_step"] == 0, torch_report["wait_sites"]
    assert torch_report["graph_on_cpu"] == [True, True]  # CUDA graphs: only on a CUDA device
    assert torch_report["pinning_on_cpu"] == [False, True]


# ---------------------------------------------------------------------------------------
# TensorFlow (this process)
# ---------------------------------------------------------------------------------------
def _bn_pair(keras, x_shape, momentum=0.9):
    rng = np.random.default_rng(0)
    a, b = keras.layers.BatchNormalization(momentum=momentum), keras.layers.BatchNormalization(momentum=momentum)
    a.build(x_shape)
    b.build(x_shape)
    for va, vb in zip(a.weights, b.weights):
        value = rng.normal(0.5, 0.3, tuple(va.shape)).astype(np.float32)
        if "variance" in va.path:
            value = np.abs(value) + 0.5
        va.assign(value)
        vb.assign(value)
    assert accelerate(keras.Sequential([b])) == 1
    return a, b


@pytest.mark.parametrize("training", [False, True])
def test_tensorflow_batchnorm_is_fused_and_equal(training: bool) -> None:
    keras = import_keras()
    tf = pytest.importorskip("tensorflow")
    x = tf.constant(np.random.default_rng(1).normal(2, 3, (4, 15, 16, 6)).astype(np.float32))
    a, b = _bn_pair(keras, x.shape)
    w = tf.constant(np.random.default_rng(2).normal(size=x.shape).astype(np.float32))
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        oa, ob = a(x, training=training), b(x, training=training)
        la, lb = tf.reduce_sum(oa * w), tf.reduce_sum(ob * w)
    np.testing.assert_allclose(ob.numpy(), oa.numpy(), atol=1e-4)
    ga, gb = tape.gradient(la, [x, a.gamma, a.beta]), tape.gradient(lb, [x, b.gamma, b.beta])
    for p, q in zip(ga, gb):
        np.testing.assert_allclose(q.numpy(), p.numpy(), atol=2e-4, rtol=1e-4)
    np.testing.assert_allclose(b.moving_mean.numpy(), a.moving_mean.numpy(), atol=1e-5)
    n = 4 * 15 * 16
    rel = np.abs(b.moving_variance.numpy() / a.moving_variance.numpy() - 1)
    if training:  # updated, with the unbiased batch variance
        assert (rel > 0).all() and (rel <= 1 / (n - 1) + 1e-6).all()
    else:
        assert rel.max() == 0


@pytest.mark.parametrize("kwargs", [
    dict(filters=5, kernel_size=1),
    dict(filters=4, kernel_size=1, use_bias=False, padding="same", activation="relu6"),
])
def test_tensorflow_pointwise_conv_is_a_matmul_and_equal(kwargs: dict) -> None:
    """On a CPU, a 1x1 stride-1 Conv2D runs as one matmul (oneDNN's 1x1 convolution
    backward is the slowest op of the CPU step); outputs and gradients are Keras'."""
    keras = import_keras()
    tf = pytest.importorskip("tensorflow")
    rng = np.random.default_rng(4)
    x = tf.constant(rng.normal(1, 2, (3, 7, 9, 6)).astype(np.float32))
    a, b = keras.layers.Conv2D(**kwargs), keras.layers.Conv2D(**kwargs)
    a.build(x.shape)
    b.build(x.shape)
    for va, vb in zip(a.weights, b.weights):
        value = rng.normal(0, 0.5, tuple(va.shape)).astype(np.float32)
        va.assign(value)
        vb.assign(value)
    assert accelerate(keras.Sequential([b])) == 1 and getattr(b, MARK)
    w = tf.constant(rng.normal(size=(3, 7, 9, kwargs["filters"])).astype(np.float32))
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        oa, ob = a(x), b(x)
        la, lb = tf.reduce_sum(oa * w), tf.reduce_sum(ob * w)
    assert ob.shape == oa.shape
    np.testing.assert_allclose(ob.numpy(), oa.numpy(), atol=1e-5)
    ga, gb = tape.gradient(la, [x, *a.trainable_weights]), tape.gradient(lb, [x, *b.trainable_weights])
    for p, q in zip(ga, gb):
        np.testing.assert_allclose(q.numpy(), p.numpy(), atol=1e-4, rtol=1e-5)
    for other in (dict(filters=3, kernel_size=3), dict(filters=3, kernel_size=1, strides=2)):
        c = keras.layers.Conv2D(**other)
        c.build(x.shape)
        assert accelerate(keras.Sequential([c])) == 0  # only 1x1 at stride 1


def test_tensorflow_model_trains_with_fused_batchnorm_and_saves_plain() -> None:
    """The CPU recipe's model: every BatchNorm fused and every 1x1 convolution a matmul,
    same inference outputs, fit runs, the saved file has no trace of the fast path."""
    keras = import_keras()
    from models.classifier import build_classifier, load_keras_model

    cfg = {"backbone": "mobilenetv2", "alpha": 0.35, "weights": "none", "image_size": 32, "flip": True}
    plain = build_classifier(3, cfg)
    fast = build_classifier(3, cfg)
    fast.set_weights(plain.get_weights())
    layers = list(fast._flatten_layers(include_self=False, recursive=True))
    bns = [layer for layer in layers if type(layer) is keras.layers.BatchNormalization]
    pointwise = [layer for layer in layers if type(layer) is keras.layers.Conv2D and layer.kernel_size == (1, 1)]
    assert len(bns) > 10 and len(pointwise) > 10
    assert accelerate(fast) == len(bns) + len(pointwise)
    rng = np.random.default_rng(3)
    x = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    np.testing.assert_allclose(fast.predict(x, verbose=0), plain.predict(x, verbose=0), atol=1e-4)
    before = [layer.moving_mean.numpy().copy() for layer in bns]
    with fast_fit() as active:
        assert active is False  # nothing to do on TensorFlow
        fast.compile(optimizer="adam", loss=keras.losses.CategoricalCrossentropy(from_logits=True))
        fast.fit(x, np.eye(3, dtype=np.float32)[[0, 1, 2, 0, 1, 2]], epochs=1, batch_size=3, verbose=0)
    assert any(np.abs(layer.moving_mean.numpy() - b).max() > 0 for layer, b in zip(bns, before))
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"fast-{os.getpid()}.keras"
    try:
        fast.save(path)
        loaded = load_keras_model(path)
    finally:
        path.unlink(missing_ok=True)
    assert not any(hasattr(layer, MARK) for layer in loaded._flatten_layers(include_self=False, recursive=True))
    np.testing.assert_allclose(loaded.predict(x, verbose=0), fast.predict(x, verbose=0), atol=1e-5)


def test_same_padding_matches_keras_output_sizes() -> None:
    """Keras' "same": ceil(n / stride) outputs; the odd pixel of padding goes after."""
    for n in range(5, 20):
        for k in (1, 2, 3, 4, 5):
            for s in (1, 2, 3):
                before, after = same_padding(n, k, s)
                assert 0 <= after - before <= 1
                assert (n + before + after - k) // s + 1 == -(-n // s)


GPU_SYNCS = r"""
import json, numpy as np, torch, keras
if not torch.cuda.is_available():
    print("NOCUDA"); raise SystemExit(0)
from models.classifier import build_classifier
from models.fast_layers import accelerate, fast_fit, host_syncs, pinned
keras.config.set_dtype_policy("mixed_bfloat16")
rng = np.random.default_rng(0)
model = build_classifier(5, {"backbone": "efficientnetb1", "weights": "none", "image_size": 64, "flip": True,
                             "rotation": 0.05, "zoom": 0.1, "translation": 0.1, "contrast": 0.1, "dropout": 0.2})
accelerate(model)
from carflow.settings import TrainSettings
from models.recipe import Phase, compile_for, lr_schedule
recipe = TrainSettings(warmup_epochs=1)
compile_for(model, recipe, "multiclass", lr_schedule(recipe, Phase("full", 0, 3, 1e-3), 5))
batch = pinned((rng.integers(0, 256, (16, 64, 64, 3), dtype=np.uint8),
                np.eye(5, dtype=np.float32)[rng.integers(0, 5, 16)], rng.random(16).astype(np.float32)))
def batches():
    while True:
        yield batch
def run(steps):
    with fast_fit():
        model.fit(batches(), epochs=1, steps_per_epoch=steps, verbose=0)
run(2)
per_step, sites = host_syncs(run)
print("REPORT " + json.dumps({"per_step": per_step, "sites": sites}))
"""


@pytest.mark.gpu
def test_torch_training_step_does_not_wait_for_the_gpu() -> None:
    """On CUDA, a training step under fast_fit as flows.train compiles it (bf16, AdamW,
    warmup + cosine, augmentation, dropout, sample weights, page-locked batches) makes no
    host-device synchronisation (``torch.cuda.set_sync_debug_mode`` counts them)."""
    report = run_torch(GPU_SYNCS)
    assert report["per_step"] == 0, report["sites"]


GPU_GRAPH = r"""
import contextlib, json, numpy as np, torch, keras
if not torch.cuda.is_available():
    print("NOCUDA"); raise SystemExit(0)
from carflow.settings import TrainSettings
from models.classifier import build_classifier
from models.fast_layers import accelerate, cuda_graph_steps, fast_fit
from models.recipe import Phase, compile_for, lr_schedule
torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
rng = np.random.default_rng(0)
xs = rng.integers(0, 256, (38, 64, 64, 3), dtype=np.uint8)
ys = np.eye(3, dtype=np.float32)[rng.integers(0, 3, 38)]
ws = (rng.random(38) + 0.5).astype(np.float32)
still = dict(flip=False, rotation=0.0, zoom=0.0, translation=0.0, contrast=0.0)

def model_for(dropout, lr=1e-3):
    keras.utils.set_random_seed(0)
    cfg = TrainSettings(weights="none", backbone="mobilenetv2", alpha=0.35, image_size=64, dropout=dropout,
                        warmup_epochs=1, **still)
    m = build_classifier(3, cfg); accelerate(m)
    compile_for(m, cfg, "multiclass", lr_schedule(cfg, Phase("full", 0, 3, lr), 5))
    return m

report, lines = {}, []
# the same training eagerly and as a graph (batches of 8, each epoch ending with one of 6)
runs = {}
for graph in (False, True):
    m = model_for(0.0)
    with fast_fit(), (cuda_graph_steps(m, warmup=2, log=lines.append) if graph else contextlib.nullcontext()) as g:
        h = m.fit(xs, ys, sample_weight=ws, batch_size=8, epochs=3, verbose=0, shuffle=False)
    runs[graph] = (m, h.history["loss"], g.replays if g is not None else None)
a, b = runs[False][0], runs[True][0]
report["weights"] = max(float(np.abs(p - q).max()) for p, q in zip(a.get_weights(), b.get_weights()))
report["moved"] = max(float(np.abs(p - q).max()) for p, q in zip(a.get_weights(), model_for(0.0).get_weights()))
report["loss"] = [runs[False][1], runs[True][1]]
report["replays"] = runs[True][2]
report["iterations"] = [int(a.optimizer.iterations), int(b.optimizer.iterations)]
report["restored"] = not hasattr(b.train_function, "replays")

# replays draw new random numbers: the same batch, a negligible rate, dropout 0.5
m = model_for(0.5, lr=1e-9)
seen = []
class Seen(keras.callbacks.Callback):
    def on_train_batch_end(self, i, logs=None):
        seen.append(float(logs["loss"]))
def same():
    while True:
        yield xs[:8], ys[:8]
with fast_fit(), cuda_graph_steps(m, warmup=2, log=lines.append) as g:
    m.fit(same(), steps_per_epoch=8, epochs=1, verbose=0, callbacks=[Seen()])
step_losses = [seen[0]] + [k * seen[k - 1] - (k - 1) * seen[k - 2] for k in range(2, 9)]  # from running means
report["dropout_losses"] = step_losses[3:]
report["dropout_replays"] = g.replays

# a step that cannot be captured (it reads a value back) falls back with one line
inp = keras.Input((8, 8, 3), dtype="uint8")
x = keras.layers.Rescaling(1 / 255)(inp)
x = keras.layers.Lambda(lambda t: t * float(t.mean() > 0))(x)
s = keras.Model(inp, keras.layers.Dense(3)(keras.layers.Flatten()(x)))
compile_for(s, TrainSettings(), "multiclass", 1e-3)
with fast_fit(), cuda_graph_steps(s, warmup=1, log=lines.append) as g:
    h = s.fit(xs[:32, :8, :8], ys[:32], batch_size=8, epochs=1, verbose=0)
report["fallback"] = {"failed": g.failed, "replays": g.replays, "loss": h.history["loss"]}
report["lines"] = lines
print("REPORT " + json.dumps(report))
"""


@pytest.mark.gpu
def test_cuda_graph_step_trains_as_the_eager_step() -> None:
    """On CUDA, the training step as one CUDA graph (``train.cuda_graphs``) trains as the
    eager step does (weights, losses, optimizer iterations; the partial batches run
    eagerly), replays draw new random numbers, and a step that cannot be captured falls
    back with one line."""
    r = run_torch(GPU_GRAPH)
    assert r["moved"] > 1e-3 and r["weights"] < 1e-4, r
    np.testing.assert_allclose(r["loss"][0], r["loss"][1], rtol=1e-4)
    assert r["iterations"] == [15, 15] and r["replays"] == 15 - 2 - 3 and r["restored"]  # 3 partial batches eager
    assert r["dropout_replays"] == 6 and np.std(r["dropout_losses"]) > 1e-4, r["dropout_losses"]
    fb = r["fallback"]
    assert fb["failed"] and fb["replays"] == 0 and np.isfinite(fb["loss"]).all()
    assert sum("capture" in line and "failed" in line for line in r["lines"]) == 1, r["lines"]
