"""Framework backends, imported lazily: importing one loads torch or tensorflow."""
from __future__ import annotations

import importlib

from optimization.base import FRAMEWORKS, LAYOUTS, Backend  # noqa: F401  (LAYOUTS: re-exported)

RUNTIMES = {"pytorch": "onnxruntime", "tensorflow": "tflite"}


def get_backend(framework: str) -> Backend:
    if framework not in FRAMEWORKS:
        raise ValueError(f"unknown framework {framework!r}; expected one of {', '.join(FRAMEWORKS)}")
    return importlib.import_module(f"optimization.backends.{framework}").BACKEND
