"""The classifier's geometric augmentation: rotation, zoom and translation as ONE affine
warp per image, batched on every backend.

:class:`RandomAffine` draws, per image, Keras' own ranges for ``RandomRotation(rotation)``
(a fraction of a full turn), ``RandomZoom(zoom)`` (1 ± zoom; above 1 zooms out) and
``RandomTranslation(translation, translation)`` (a fraction of the side), composes them
into one transform about the image centre and applies it once, bilinear, with reflected
borders (Keras' default ``fill_mode``). It is active only while training.

Why not the three Keras layers: Keras 3's torch backend implements
``keras.ops.image.affine_transform`` with a Python loop over the batch (one
``map_coordinates`` per image, about 8 gathers each), so the three layers alone ran at
160 img/s for a batch of 256 240-px images on an H200, a quarter of the model's own
training rate (probe in the closing note of issue 11). Here the torch backend warps the
whole batch with ``torch.nn.functional.grid_sample`` (one kernel); the other backends call
``keras.ops.image.affine_transform`` (TensorFlow's ``ImageProjectiveTransformV3``, JAX's
vectorised ``map_coordinates``) once instead of three times. Flip and contrast stay
Keras' own layers (already batched).

XLA has no kernel for ``ImageProjectiveTransformV3``, so a TensorFlow model compiled with
``jit_compile`` (``train.xla``) could not train with it. :func:`use_xla` switches the
model's :class:`RandomAffine` layers to the same warp in four gathers (``_tf_gather_warp``),
which XLA compiles; without XLA the TensorFlow kernel stays (it is twice as fast on a CPU:
4.1 ms against 8.4 ms for 32 images of 96 px).

:func:`warp` is the transform's one implementation; the tests check the torch and gather
paths against ``keras.ops.image.affine_transform`` on the same transforms.
"""

from __future__ import annotations

import math
from typing import Any

from carflow.frameworks import import_keras, import_tensorflow

keras = import_keras()


def _torch_warp(images: Any, transforms: Any) -> Any:
    """``keras.ops.image.affine_transform(images, transforms, "bilinear", "reflect")`` for
    NHWC torch tensors, as one batched ``grid_sample``."""
    import torch
    import torch.nn.functional as F

    n, h, w, _ = images.shape
    x = images.permute(0, 3, 1, 2).float()
    t = transforms.float()
    # output pixel (x, y) -> input pixel, in grid_sample's normalised coordinates
    # (align_corners=False: u = a·x + b, a = 2/W, b = 1/W - 1; v = c·y + d): θ = N·T·N⁻¹,
    # written out with Python scalars so that no constant is copied to the device
    a, b, c, d = 2.0 / w, 1.0 / w - 1.0, 2.0 / h, 1.0 / h - 1.0
    t0, t1, t2, t3, t4, t5 = (t[:, i] for i in range(6))
    theta = torch.stack([
        torch.stack([t0, (a / c) * t1, a * t2 - b * t0 - (a * d / c) * t1 + b], 1),
        torch.stack([(c / a) * t3, t4, c * t5 - (c * b / a) * t3 - d * t4 + d], 1)], 1)
    grid = F.affine_grid(theta, [n, x.shape[1], h, w], align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    return out.permute(0, 2, 3, 1).to(images.dtype)


def _tf_reflect(coord: Any, length: int) -> Any:
    """``fill_mode="reflect"`` (d c b a | a b c d | d c b a) of a continuous pixel
    coordinate, as TensorFlow's kernel maps it, clipped to the image."""
    tf = import_tensorflow()

    period = 2.0 * length
    t = tf.math.floormod(coord + 0.5, period)
    return tf.clip_by_value(tf.where(t < length, t, period - t) - 0.5, 0.0, length - 1.0)


def _tf_gather_warp(images: Any, transforms: Any) -> Any:
    """``keras.ops.image.affine_transform(images, transforms, "bilinear", "reflect")`` for
    NHWC TensorFlow tensors in ops XLA compiles: the source coordinates of every output
    pixel, reflected, and four batched gathers."""
    tf = import_tensorflow()

    n, h, w, c = tf.shape(images)[0], int(images.shape[1]), int(images.shape[2]), int(images.shape[3])
    ys, xs = tf.meshgrid(tf.range(h, dtype=tf.float32), tf.range(w, dtype=tf.float32), indexing="ij")
    xs, ys = tf.reshape(xs, [1, -1]), tf.reshape(ys, [1, -1])
    t = tf.cast(transforms, tf.float32)
    sx = _tf_reflect(t[:, 0:1] * xs + t[:, 1:2] * ys + t[:, 2:3], w)
    sy = _tf_reflect(t[:, 3:4] * xs + t[:, 4:5] * ys + t[:, 5:6], h)
    x0, y0 = tf.floor(sx), tf.floor(sy)
    fx, fy = (sx - x0)[..., None], (sy - y0)[..., None]
    x0, y0 = tf.cast(x0, tf.int32), tf.cast(y0, tf.int32)
    x1, y1 = tf.minimum(x0 + 1, w - 1), tf.minimum(y0 + 1, h - 1)
    flat = tf.reshape(images, [n, h * w, c])

    def at(y: Any, x: Any) -> Any:
        return tf.gather(flat, y * w + x, batch_dims=1)

    top = at(y0, x0) * (1.0 - fx) + at(y0, x1) * fx
    bottom = at(y1, x0) * (1.0 - fx) + at(y1, x1) * fx
    return tf.reshape(top * (1.0 - fy) + bottom * fy, [n, h, w, c])


def warp(images: Any, transforms: Any, xla: bool = False) -> Any:
    """Apply one 8-parameter transform per image (``keras.ops.image.affine_transform``'s
    format: output pixel → input pixel), bilinear, reflected borders. ``xla``: in ops
    that TensorFlow's XLA compiles (the other backends' paths already are)."""
    backend = keras.backend.backend()
    if backend == "torch":
        return _torch_warp(images, transforms)
    if xla and backend == "tensorflow":
        return _tf_gather_warp(images, transforms)
    return keras.ops.image.affine_transform(images, transforms, interpolation="bilinear", fill_mode="reflect")


def use_xla(model: Any, on: bool = True) -> int:
    """Make the :class:`RandomAffine` layers of ``model`` (nested ones included) warp in
    ops XLA compiles (``on``), for a model compiled with ``jit_compile``; returns how
    many. A runtime switch: not saved with the model."""
    done = 0
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, RandomAffine):
            layer.xla = bool(on)
            done += 1
    return done


def affine_params(n: Any, height: int, width: int, rotation: float, zoom: float, translation: float,
                  seed: Any) -> Any:
    """``[n, 8]`` transforms: a random rotation (± ``rotation`` of a turn), zoom (1 ±
    ``zoom``) and shift (± ``translation`` of each side) about the image centre."""
    ops = keras.ops

    def uniform(bound: float) -> Any:
        return keras.random.uniform((n,), -bound, bound, seed=seed) if bound else ops.zeros((n,))

    angle = uniform(rotation) * (2.0 * math.pi)
    scale = 1.0 + uniform(zoom)
    tx, ty = uniform(translation) * width, uniform(translation) * height
    a0, a1 = scale * ops.cos(angle), -scale * ops.sin(angle)
    b0, b1 = scale * ops.sin(angle), scale * ops.cos(angle)
    cx, cy = (width - 1) / 2.0, (height - 1) / 2.0
    a2 = cx - a0 * cx - a1 * cy + tx
    b2 = cy - b0 * cx - b1 * cy + ty
    zero = ops.zeros((n,))
    return ops.stack([a0, a1, a2, b0, b1, b2, zero, zero], axis=1)


@keras.saving.register_keras_serializable(package="carflow")
class RandomAffine(keras.layers.Layer):
    """Random rotation + zoom + translation as one warp (Keras' ranges), training only."""

    def __init__(self, rotation: float = 0.0, zoom: float = 0.0, translation: float = 0.0,
                 seed: int | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.rotation, self.zoom, self.translation, self.seed = float(rotation), float(zoom), float(translation), seed
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.supports_masking = False
        self.xla = False  # set by use_xla(): warp in ops XLA compiles

    def call(self, images: Any, training: bool | None = None) -> Any:
        if not training or not (self.rotation or self.zoom or self.translation):
            return images
        shape = keras.ops.shape(images)
        transforms = affine_params(shape[0], int(images.shape[1]), int(images.shape[2]), self.rotation, self.zoom,
                                   self.translation, self.seed_generator)
        out = warp(keras.ops.cast(images, "float32"), keras.ops.cast(transforms, "float32"), xla=self.xla)
        return keras.ops.cast(out, images.dtype)

    def compute_output_shape(self, input_shape: Any) -> Any:
        return input_shape

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "rotation": self.rotation, "zoom": self.zoom,
                "translation": self.translation, "seed": self.seed}
