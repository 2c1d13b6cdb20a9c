"""Framework backends, imported lazily: importing one loads torch or tensorflow."""
from __future__ import annotations

import importlib

from optimization.base import FRAMEWORKS, LAYOUTS, Backend  # noqa: F401  (LAYOUTS: re-exported)
from optimization.hostcpu import keep_matrix_engine_out

# before LiteRT or onnxruntime pick their CPU kernels: host latency is measured without the
# matrix engine edge boards lack (see optimization.hostcpu)
keep_matrix_engine_out()

RUNTIMES = {"pytorch": "onnxruntime", "tensorflow": "tflite"}


def get_backend(framework: str) -> Backend:
    if framework not in FRAMEWORKS:
        raise ValueError(f"unknown framework {framework!r}; expected one of {', '.join(FRAMEWORKS)}")
    return importlib.import_module(f"optimization.backends.{framework}").BACKEND
