"""A `.pth` upload is checked against the built-in architectures without torch: the layouts
file matches the real modules, and a state_dict's names and shapes are read from its pickle
alone, for both torch.save formats."""
from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")

from optimization.base import InvalidInputError, UnsafeModelError  # noqa: E402
from optimization.safety.torch_files import state_dict_shapes, torch_file_kind  # noqa: E402
from optimization.zoo import layouts  # noqa: E402
from optimization.zoo.pytorch import build, state_dict_layouts  # noqa: E402


def saved_state_dict(module, path, legacy=False):
    torch.save(module.state_dict(), path, _use_new_zipfile_serialization=not legacy)
    return path


def test_the_layouts_file_matches_the_real_architectures():
    assert json.loads(layouts.LAYOUTS_FILE.read_text()) == state_dict_layouts(), (
        "run `python -m optimization.zoo.pytorch` to rewrite optimization/zoo/pytorch_state_dicts.json")
    assert layouts.ARCHITECTURE_NAMES == ("digits_cnn", "mobilenet_v2", "resnet_small")


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_a_state_dict_is_read_without_loading_and_matches_its_architecture(tmp_path, legacy):
    module = build("resnet_small", 7, 3)
    path = saved_state_dict(module, tmp_path / "w.pth", legacy)

    shapes = state_dict_shapes(path, "'w.pth'")

    assert shapes == {key: tuple(value.shape) for key, value in module.state_dict().items()}
    assert layouts.match_state_dict(shapes, "resnet_small", "'w.pth'") == {"num_classes": 7, "in_channels": 3}


def test_weights_of_another_architecture_name_what_is_missing(tmp_path):
    shapes = state_dict_shapes(saved_state_dict(build("resnet_small", 10, 1), tmp_path / "w.pth"), "'w.pth'")

    with pytest.raises(InvalidInputError, match=r"does not hold the weights of 'digits_cnn': missing .*unexpected"):
        layouts.match_state_dict(shapes, "digits_cnn", "'w.pth'")


def test_another_width_of_the_same_architecture_names_the_first_layer_that_differs(tmp_path):
    shapes = state_dict_shapes(saved_state_dict(build("digits_cnn", 10, 1, width=16), tmp_path / "w.pth"), "'w.pth'")

    with pytest.raises(InvalidInputError, match=r"features.0.0.weight has shape \(16, 1, 3, 3\) where 'digits_cnn' has \(32, 1, 3, 3\)"):
        layouts.match_state_dict(shapes, "digits_cnn", "'w.pth'")


def test_an_unknown_architecture_lists_the_built_in_ones():
    with pytest.raises(InvalidInputError, match="digits_cnn, mobilenet_v2, resnet_small"):
        layouts.check_architecture_name("resnet50")


def test_a_pickled_whole_model_is_not_a_state_dict(tmp_path):
    torch.save(torch.nn.Linear(2, 2), tmp_path / "whole.pth")

    with pytest.raises(UnsafeModelError, match="plain state_dict"):
        state_dict_shapes(tmp_path / "whole.pth", "'whole.pth'")


def test_torch_file_kinds_are_told_apart_by_their_entries(tmp_path):
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
    torch.jit.save(torch.jit.script(net), tmp_path / "s.pt")
    torch.export.save(torch.export.export(net, (torch.zeros(2, 4),)), tmp_path / "e.pt2")
    saved_state_dict(net, tmp_path / "w.pt")
    saved_state_dict(net, tmp_path / "legacy.pt", legacy=True)

    kinds = {name: torch_file_kind(tmp_path / name) for name in ("s.pt", "e.pt2", "w.pt", "legacy.pt")}

    assert kinds == {"s.pt": "torchscript", "e.pt2": "exported", "w.pt": "saved", "legacy.pt": "saved"}
