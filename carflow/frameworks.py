"""Import the deep-learning frameworks in an order that lets them share one process.

TensorFlow and triton (which torch imports for ultralytics) each bundle LLVM. Importing
triton after TensorFlow aborts the process ("LLVM ERROR: inconsistency in registered
CommandLine options"); the other order works. A Prefect worker can run the car filter
(TensorFlow) and the cropper (torch) in one process, so every TensorFlow/Keras import in
carflow goes through here and loads triton first when it is installed.

Both imports also silence TensorFlow's start-up banners where they are made: its C++
code logs through absl before absl is initialised, so ``TF_CPP_MIN_LOG_LEVEL`` does not
reach them ("All log messages before absl::InitializeLog()…", the oneDNN notice, "Could
not find cuda drivers", "failed call to cuInit" on a machine without a GPU). The import
and the first device query run with the process's stderr (file descriptor 2) captured;
the known banner lines are dropped and anything else is written back.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

#: native start-up lines of TensorFlow/absl/XLA that say nothing a user can act on
NATIVE_NOISE = re.compile(
    r"All log messages before absl::InitializeLog|oneDNN custom operations are on|"
    r"Could not find cuda drivers|failed call to cuInit|Unable to register cu(DNN|FFT|BLAS) factory|"
    r"computation placer already registered|TensorFlow binary is optimized to use available CPU|"
    r"rebuild TensorFlow with the appropriate compiler flags|This TensorFlow binary is optimized|"
    r"cuda_(platform|executor|dnn|fft|blas)\.cc|cudart_stub\.cc|port\.cc:\d+\] oneDNN"
)


@contextlib.contextmanager
def quiet_native_stderr(noise: re.Pattern[str] = NATIVE_NOISE) -> Iterator[None]:
    """Capture file descriptor 2 around the body (C/C++ code writes there directly) and
    write back every line that is not ``noise``."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real fd 2 (embedded, some test runners): nothing to do
        yield
        return
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            try:
                sys.stderr.flush()
            except ValueError:
                pass
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            kept = [line for line in capture.read().decode("utf-8", "replace").splitlines(keepends=True)
                    if line.strip() and not noise.search(line)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


def _triton_first() -> None:
    if "tensorflow" in sys.modules or "triton" in sys.modules:
        return
    if importlib.util.find_spec("triton") is not None:
        import triton  # noqa: F401


def import_tensorflow() -> Any:
    """``import tensorflow`` (triton first, see the module docstring)."""
    _triton_first()
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    with quiet_native_stderr():
        import tensorflow

        tensorflow.config.list_physical_devices()  # the CUDA probe ("failed call to cuInit")
    return tensorflow


def import_keras() -> Any:
    """``import keras`` (its TensorFlow backend loads TensorFlow: triton first)."""
    _triton_first()
    if "keras" in sys.modules:
        return sys.modules["keras"]
    if os.environ.get("KERAS_BACKEND", "tensorflow") == "tensorflow":
        import_tensorflow()
    with quiet_native_stderr():
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
