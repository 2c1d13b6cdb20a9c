"""Technique registry: `optimization.techniques.{framework}.{name}.Technique`, imported lazily."""
from __future__ import annotations

import importlib

from optimization.base import FRAMEWORKS, TECHNIQUES, BaseOptimization


def get_technique(framework: str, name: str) -> BaseOptimization:
    if framework not in FRAMEWORKS:
        raise ValueError(f"unknown framework {framework!r}")
    if name not in TECHNIQUES:
        raise ValueError(f"unknown technique {name!r}; expected one of {', '.join(TECHNIQUES)}")
    module = importlib.import_module(f"optimization.techniques.{framework}.{name}")
    return module.Technique()
