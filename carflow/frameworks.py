"""Import the deep-learning frameworks in an order that lets them share one process.

TensorFlow and triton (which torch imports for ultralytics) each bundle LLVM. Importing
triton after TensorFlow aborts the process ("LLVM ERROR: inconsistency in registered
CommandLine options"); the other order works. A Prefect worker can run the car filter
(TensorFlow) and the cropper (torch) in one process, so every TensorFlow/Keras import in
carflow goes through here and loads triton first when it is installed.
"""

from __future__ import annotations

import functools
import importlib.util
import sys
from pathlib import Path
from typing import Any


def _triton_first() -> None:
    if "tensorflow" in sys.modules or "triton" in sys.modules:
        return
    if importlib.util.find_spec("triton") is not None:
        import triton  # noqa: F401


def import_tensorflow() -> Any:
    """``import tensorflow`` (triton first, see the module docstring)."""
    _triton_first()
    import tensorflow

    return tensorflow


def import_keras() -> Any:
    """``import keras`` (its TensorFlow backend loads TensorFlow: triton first)."""
    _triton_first()
    import keras

    return keras


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """True on CPUs with Intel AMX bf16 tiles (Sapphire Rapids and later), where bf16
    inference is fast; without them bf16 is emulated and slower than fp32. Read from the
    CPU flags, so asking loads neither torch nor TensorFlow."""
    try:
        return "amx_bf16" in Path("/proc/cpuinfo").read_text().split()
    except OSError:  # not Linux: no cheap way to know, stay on fp32
        return False
