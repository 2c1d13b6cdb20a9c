"""The built-in PyTorch architectures' state_dict layouts, for checking a `.pth` upload in the
web process, which never imports torch.

`pytorch_state_dicts.json` is written by `python -m optimization.zoo.pytorch` from the real
modules (tests/engine/test_zoo_layouts.py fails when it falls behind them): every key of each
architecture's state_dict with its shape, where a dimension that follows the dataset is named
"num_classes" or "in_channels".
"""
from __future__ import annotations

import json
from pathlib import Path

from optimization.base import InvalidInputError

LAYOUTS_FILE = Path(__file__).with_name("pytorch_state_dicts.json")
STATE_DICT_LAYOUTS: dict[str, dict[str, list]] = json.loads(LAYOUTS_FILE.read_text())
ARCHITECTURE_NAMES = tuple(sorted(STATE_DICT_LAYOUTS))
MISMATCHES_LISTED = 3


def check_architecture_name(name: str) -> None:
    if name not in STATE_DICT_LAYOUTS:
        raise InvalidInputError(
            f"unknown architecture {name!r}; the built-in ones are {', '.join(ARCHITECTURE_NAMES)}. "
            "For another architecture upload a torch.export .pt2 or a TorchScript .pt instead")


def match_state_dict(shapes: dict[str, tuple[int, ...]], architecture: str, label: str) -> dict[str, int]:
    """Check a state_dict's keys and shapes against `architecture`; return the dimensions that
    follow the dataset ({"num_classes": 10, "in_channels": 1}). Raises InvalidInputError that
    names what differs."""
    check_architecture_name(architecture)
    expected = STATE_DICT_LAYOUTS[architecture]
    missing, unexpected = sorted(expected.keys() - shapes.keys()), sorted(shapes.keys() - expected.keys())
    if missing or unexpected:
        parts = [f"{what} {', '.join(keys[:MISMATCHES_LISTED])}{' …' if len(keys) > MISMATCHES_LISTED else ''}"
                 f" ({len(keys)})" for what, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
        raise InvalidInputError(
            f"{label} does not hold the weights of {architecture!r}: {'; '.join(parts)}. Save "
            f"model.state_dict() of the built-in {architecture!r}, or upload a .pt2 / TorchScript .pt")
    bound: dict[str, int] = {}
    for key, layout in expected.items():
        shape = tuple(shapes[key])
        if len(shape) == len(layout):  # the first key that has a dimension binds it
            for dim, size in zip(layout, shape):
                if isinstance(dim, str):
                    bound.setdefault(dim, size)
        want = tuple(bound.get(dim, dim) if isinstance(dim, str) else dim for dim in layout)
        if shape != want:
            raise InvalidInputError(
                f"{label}: {key} has shape {shape} where {architecture!r} has {want}; "
                "the file holds a different variant (width, depth) of the architecture")
    return bound
