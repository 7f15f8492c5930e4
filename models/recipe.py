"""The classifier's training recipe as Keras objects, without TensorFlow or Prefect at
import (so ``bench/train.py`` compiles a model exactly as ``python -m flows.train`` does,
on a GPU box that has neither): the phases' learning-rate schedule (:func:`lr_schedule`:
:class:`models.schedules.WarmupCosineDecay`), the optimizer (:func:`make_optimizer`),
loss and metric (:func:`compile_for`) and whether the step is compiled
(:func:`uses_jit`). ``tasks/train.py`` plans the phases and runs them. Keras is imported
when a function runs, not at import.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from carflow.frameworks import import_keras
from carflow.settings import TrainSettings


@dataclass(frozen=True)
class Phase:
    """Epochs ``[start, end)`` of one training phase, at ``learning_rate``."""

    name: str  # head | finetune | full
    start: int
    end: int
    learning_rate: float


def lr_schedule(cfg: TrainSettings, phase: Phase, steps_per_epoch: int) -> Any:
    """Linear warmup over ``warmup_epochs`` to the phase's rate, then cosine decay to 0 over
    the rest of the phase (``schedule=cosine``: :class:`models.schedules.WarmupCosineDecay`),
    or the rate after warmup (``constant``)."""
    from models.schedules import WarmupCosineDecay

    keras = import_keras()
    total = max(1, (phase.end - phase.start) * steps_per_epoch)
    warmup = min(int(round(cfg.warmup_epochs * steps_per_epoch)), total - 1)
    if cfg.schedule == "constant" and not warmup:
        return phase.learning_rate
    if cfg.schedule == "constant":
        return keras.optimizers.schedules.PiecewiseConstantDecay(
            [warmup], [phase.learning_rate * 0.1, phase.learning_rate])
    return WarmupCosineDecay(
        initial_learning_rate=0.0 if warmup else phase.learning_rate,
        decay_steps=max(1, total - warmup),
        warmup_target=phase.learning_rate if warmup else None,
        warmup_steps=warmup,
    )


def make_optimizer(cfg: TrainSettings, lr: Any) -> Any:
    keras = import_keras()
    if cfg.optimizer == "sgd":
        return keras.optimizers.SGD(lr, momentum=cfg.momentum, nesterov=True)
    if cfg.optimizer == "adam":
        return keras.optimizers.Adam(lr)
    return keras.optimizers.AdamW(lr, weight_decay=cfg.weight_decay)


def compile_for(model: Any, cfg: TrainSettings, task: str, lr: Any) -> None:
    """Compile ``model`` for ``task`` (``multiclass``: softmax cross-entropy and categorical
    accuracy; ``multilabel``: sigmoid cross-entropy and binary accuracy at logit 0), with
    label smoothing, :func:`make_optimizer` at ``lr`` and :func:`uses_jit`."""
    keras = import_keras()
    if task == "multilabel":
        loss = keras.losses.BinaryCrossentropy(from_logits=True, label_smoothing=cfg.label_smoothing)
        metrics = [keras.metrics.BinaryAccuracy(name="acc", threshold=0.0)]
    else:
        loss = keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=cfg.label_smoothing)
        metrics = [keras.metrics.CategoricalAccuracy(name="acc")]
    model.compile(optimizer=make_optimizer(cfg, lr), loss=loss, metrics=metrics, jit_compile=uses_jit(cfg))


def uses_jit(cfg: TrainSettings) -> bool:
    """Whether training compiles its step (``jit_compile``): ``train.xla``, and always on
    JAX (whose step without it runs op by op)."""
    return bool(cfg.xla) or import_keras().backend.backend() == "jax"
