"""models.augment: one batched affine warp for rotation + zoom + translation."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from carflow.frameworks import import_keras
from models.augment import RandomAffine, affine_params, use_xla, warp
from models.classifier import build_classifier

ROOT = Path(__file__).resolve().parents[1]

TORCH_VS_KERAS = r"""
import numpy as np, torch, keras
from models.augment import affine_params, _torch_warp
rng = np.random.default_rng(0)
img = rng.random((4, 20, 24, 3)).astype("float32") * 255
t = keras.ops.convert_to_numpy(affine_params(4, 20, 24, 0.1, 0.2, 0.15, keras.random.SeedGenerator(1)))
assert np.abs(t[:, :6]).sum() > 0
ref = keras.ops.convert_to_numpy(keras.ops.image.affine_transform(torch.tensor(img), torch.tensor(t), "bilinear", "reflect"))
got = keras.ops.convert_to_numpy(_torch_warp(torch.tensor(img), torch.tensor(t)))
print(float(np.abs(ref - got).max()), float(np.abs(ref - img).mean()))
"""


def test_torch_batched_warp_equals_keras_affine_transform():
    """The torch path (one grid_sample) gives Keras' own affine_transform's pixels (its
    per-image loop), borders included, on the same random transforms."""
    env = {**os.environ, "KERAS_BACKEND": "torch", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", TORCH_VS_KERAS], env=env, capture_output=True, text=True,
                         timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    max_diff, moved = (float(v) for v in out.stdout.split()[-2:])
    assert max_diff < 0.01  # on a 0..255 scale
    assert moved > 5  # the transforms really moved pixels


def test_identity_transform_keeps_the_image():
    keras = import_keras()
    img = np.random.default_rng(1).random((2, 8, 10, 3)).astype("float32")
    ident = np.tile(np.array([1, 0, 0, 0, 1, 0, 0, 0], "float32"), (2, 1))
    out = keras.ops.convert_to_numpy(warp(img, ident))
    np.testing.assert_allclose(out, img, atol=1e-5)


def test_random_affine_is_active_only_while_training():
    keras = import_keras()
    img = np.random.default_rng(2).random((3, 16, 16, 3)).astype("float32") * 255
    layer = RandomAffine(0.1, 0.1, 0.1, seed=3)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(layer(img, training=False)), img)
    moved = keras.ops.convert_to_numpy(layer(img, training=True))
    assert moved.shape == img.shape
    assert np.abs(moved - img).mean() > 1.0
    still = RandomAffine(0, 0, 0)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(still(img, training=True)), img)


def test_params_stay_in_keras_ranges():
    keras = import_keras()
    t = keras.ops.convert_to_numpy(affine_params(500, 20, 20, 0.0, 0.1, 0.0, keras.random.SeedGenerator(0)))
    scale = np.hypot(t[:, 0], t[:, 3])
    assert 0.9 <= scale.min() < 0.95 and 1.05 < scale.max() <= 1.1  # zoom 1 ± 0.1, spread over the range
    t = keras.ops.convert_to_numpy(affine_params(500, 20, 40, 0.0, 0.0, 0.25, keras.random.SeedGenerator(0)))
    assert np.abs(t[:, 2]).max() <= 10 + 1e-4 and np.abs(t[:, 5]).max() <= 5 + 1e-4  # ± a quarter of each side
    assert np.abs(t[:, 2]).max() > 8


def test_contrast_clips_to_the_backbones_pixel_range():
    """MobileNetV2/ResNet50V2 see [-1, 1] pixels: contrast must not clip them to [0, 255]
    (that zeroed every dark pixel while training, never while serving)."""
    cfg = {"weights": "none", "image_size": 32, "alpha": 0.35, "contrast": 0.1, "rotation": 0.05}
    for backbone, expected in (("mobilenetv2", (-1.0, 1.0)), ("efficientnetb1", (0.0, 255.0))):
        model = build_classifier(3, {**cfg, "backbone": backbone})
        layers = {type(layer).__name__: layer for layer in model.get_layer("augment").layers}
        assert tuple(layers["RandomContrast"].value_range) == expected
        assert "RandomAffine" in layers and "RandomRotation" not in layers


def test_xla_warp_equals_keras_affine_transform_and_compiles():
    """TensorFlow under XLA (``train.xla``): ImageProjectiveTransformV3 has no XLA kernel,
    so use_xla() switches RandomAffine to four gathers: the same pixels as Keras'
    affine_transform (borders included), and a jit-compiled fit of the classifier runs."""
    keras = import_keras()
    import tensorflow as tf

    rng = np.random.default_rng(0)
    img = rng.random((4, 20, 24, 3)).astype("float32") * 255
    t = keras.ops.convert_to_numpy(affine_params(4, 20, 24, 0.1, 0.2, 0.15, keras.random.SeedGenerator(1)))
    ref = keras.ops.convert_to_numpy(keras.ops.image.affine_transform(img, t, "bilinear", "reflect"))
    compiled = tf.function(lambda x, m: warp(x, m, xla=True), jit_compile=True)
    got = compiled(tf.constant(img), tf.constant(t)).numpy()
    assert np.abs(ref - img).mean() > 5  # the transforms really moved pixels
    np.testing.assert_allclose(got, ref, atol=0.01)  # on a 0..255 scale

    cfg = {"backbone": "mobilenetv2", "alpha": 0.35, "weights": "none", "image_size": 32,
           "rotation": 0.1, "zoom": 0.1, "translation": 0.1}
    model = build_classifier(3, cfg)
    assert use_xla(model) == 1
    model.compile(optimizer="adam", loss=keras.losses.CategoricalCrossentropy(from_logits=True), jit_compile=True)
    x = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    history = model.fit(x, np.eye(3, dtype=np.float32)[[0, 1, 2, 0, 1, 2]], epochs=1, batch_size=3, verbose=0)
    assert np.isfinite(history.history["loss"][0])
