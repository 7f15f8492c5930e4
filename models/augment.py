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

:func:`warp` is the transform's one implementation; the test checks the torch path
against ``keras.ops.image.affine_transform`` on the same transforms.
"""

from __future__ import annotations

import math
from typing import Any

from carflow.frameworks import import_keras

keras = import_keras()


def _torch_warp(images: Any, transforms: Any) -> Any:
    """``keras.ops.image.affine_transform(images, transforms, "bilinear", "reflect")`` for
    NHWC torch tensors, as one batched ``grid_sample``."""
    import torch
    import torch.nn.functional as F

    n, h, w, _ = images.shape
    x = images.permute(0, 3, 1, 2).float()
    t = transforms.float()
    ones, zeros = torch.ones_like(t[:, 0]), torch.zeros_like(t[:, 0])
    # output pixel (x, y) -> input pixel, in pixel coordinates (pixel centres at integers)
    m = torch.stack([torch.stack([t[:, 0], t[:, 1], t[:, 2]], 1),
                     torch.stack([t[:, 3], t[:, 4], t[:, 5]], 1),
                     torch.stack([zeros, zeros, ones], 1)], 1)
    # grid_sample's normalised coordinates (align_corners=False): u = (2x + 1) / W - 1
    to_norm = torch.tensor([[2.0 / w, 0.0, 1.0 / w - 1.0], [0.0, 2.0 / h, 1.0 / h - 1.0], [0.0, 0.0, 1.0]],
                           device=x.device)
    from_norm = torch.linalg.inv(to_norm)
    theta = (to_norm @ m @ from_norm)[:, :2, :]
    grid = F.affine_grid(theta, [n, x.shape[1], h, w], align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    return out.permute(0, 2, 3, 1).to(images.dtype)


def warp(images: Any, transforms: Any) -> Any:
    """Apply one 8-parameter transform per image (``keras.ops.image.affine_transform``'s
    format: output pixel → input pixel), bilinear, reflected borders."""
    if keras.backend.backend() == "torch":
        return _torch_warp(images, transforms)
    return keras.ops.image.affine_transform(images, transforms, interpolation="bilinear", fill_mode="reflect")


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

    def call(self, images: Any, training: bool | None = None) -> Any:
        if not training or not (self.rotation or self.zoom or self.translation):
            return images
        shape = keras.ops.shape(images)
        transforms = affine_params(shape[0], int(images.shape[1]), int(images.shape[2]), self.rotation, self.zoom,
                                   self.translation, self.seed_generator)
        out = warp(keras.ops.cast(images, "float32"), keras.ops.cast(transforms, "float32"))
        return keras.ops.cast(out, images.dtype)

    def compute_output_shape(self, input_shape: Any) -> Any:
        return input_shape

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "rotation": self.rotation, "zoom": self.zoom,
                "translation": self.translation, "seed": self.seed}
