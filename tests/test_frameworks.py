"""TensorFlow (car filter) and torch/triton (YOLO) can share one worker process."""

from __future__ import annotations

import subprocess
import sys

import pytest

CODE = """
from carflow.frameworks import import_tensorflow
tf = import_tensorflow()
import torch, triton  # triton after TensorFlow aborts the process unless triton came first
print(float(tf.reduce_sum(tf.ones(3))), float(torch.ones(2).sum()))
"""


@pytest.mark.integration
def test_tensorflow_then_torch_in_one_process():
    pytest.importorskip("triton")
    proc = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=300,
                          env={"TF_CPP_MIN_LOG_LEVEL": "3", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[-2:] == ["3.0", "2.0"]
