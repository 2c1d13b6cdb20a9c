"""The settings a process that runs the engine makes once, at its start, before torch,
TensorFlow, LiteRT or onnxruntime load: the worker task, `seed_demo`, the benchmarks and the
test session call `prepare_worker_process()`; nothing is switched on at import time.

- Keras 2: tfmot needs the Keras 2 implementation (tf_keras), which TensorFlow picks only if
  TF_USE_LEGACY_KERAS is set before it is first imported.
- AMX kept out: host latency is measured without the matrix engine edge boards lack
  (optimization.hostcpu), which must be denied before a runtime picks its kernels.
- Torch threads: one intra-op thread by default; on a shared machine OpenMP threads spinning
  against other processes made training 5-20x slower than a single thread.
  EDGEOPT_TORCH_THREADS asks for more.
"""
from __future__ import annotations

import os

from optimization.hostcpu import keep_matrix_engine_out

TORCH_THREADS_ENV = "EDGEOPT_TORCH_THREADS"


def prepare_worker_process() -> dict:
    """Apply the settings (idempotent) and return them, for reports."""
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    amx = keep_matrix_engine_out()
    import torch

    threads = int(os.environ.get(TORCH_THREADS_ENV, "1"))
    torch.set_num_threads(threads)
    return {"keras": "tf_keras (legacy Keras 2)", "amx": amx, "torch_threads": threads}
