"""The training recipe's learning-rate schedule, a Keras object saved with the model
(training checkpoints hold the optimizer, and with it the schedule).

:class:`WarmupCosineDecay` is Keras' ``CosineDecay`` (linear warmup to ``warmup_target``,
then cosine decay), the same rates step for step, with the two branches chosen by
``ops.where`` instead of ``ops.cond``. On the torch backend ``ops.cond`` is a Python
``if`` on a device tensor: the host reads the step's predicate back from the GPU, so
every training step waited there for its whole backward pass to finish before it could
queue the optimizer's update. Both branches are a few scalar ops, so computing both
costs nothing. Registered as ``carflow>WarmupCosineDecay``;
:func:`models.classifier.load_keras_model` imports this module before loading, and
:func:`models.recipe.lr_schedule` builds it.
"""

from __future__ import annotations

from typing import Any

from carflow.frameworks import import_keras

keras = import_keras()


@keras.saving.register_keras_serializable(package="carflow")
class WarmupCosineDecay(keras.optimizers.schedules.CosineDecay):
    """``keras.optimizers.schedules.CosineDecay`` (same arguments and config) without a
    host round trip per step on torch."""

    def __call__(self, step: Any) -> Any:
        if self.warmup_target is None:
            return super().__call__(step)  # no branch: Keras' own arithmetic
        ops = keras.ops
        with keras.name_scope(self.name):
            initial = ops.convert_to_tensor(self.initial_learning_rate)
            dtype = initial.dtype
            decay_steps = ops.cast(self.decay_steps, dtype)
            warmup_target = ops.cast(self.warmup_target, dtype)
            warmup_steps = ops.cast(self.warmup_steps, dtype)
            step = ops.minimum(ops.cast(step, dtype), decay_steps + warmup_steps)
            warming = self._warmup_function(step, warmup_steps, warmup_target, initial)
            decaying = self._decay_function(step - warmup_steps, decay_steps, warmup_target, dtype)
            return ops.where(step < warmup_steps, warming, decaying)
