"""How the PyTorch channel cut (prune_channels, shared by prune_structured, hybrid and
distillation) rounds narrow layers."""
import torch
from torch import nn

from optimization.techniques.pytorch._common import prune_channels


def _narrow_net() -> nn.Module:
    """Layer widths like timm's lcnet_035: narrow layers a halving does not leave on a multiple of 16."""
    layers, cin = [], 3
    for width in (24, 48, 88, 256):
        layers += [nn.Conv2d(cin, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
        cin = width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 10)).eval()


def test_rounding_to_the_multiple_never_takes_more_than_the_ratio_from_a_layer():
    net = _narrow_net()
    pruned, multiple = prune_channels(net, (3, 8, 8), 0.5)
    widths = [layer.out_channels for layer in pruned.modules() if isinstance(layer, nn.Conv2d)]
    # half of each, rounded up to 16; Torch-Pruning's own rounding down kept 24 (all), 16, 32, 128
    assert multiple == 16
    assert widths == [16, 32, 48, 128]
    assert pruned(torch.randn(2, 3, 8, 8)).shape == (2, 10)


def test_without_rounding_the_ratio_is_taken_from_every_layer():
    pruned, multiple = prune_channels(_narrow_net(), (3, 8, 8), 0.5, round_to=None)
    assert multiple is None
    assert [layer.out_channels for layer in pruned.modules() if isinstance(layer, nn.Conv2d)] == [12, 24, 44, 128]
