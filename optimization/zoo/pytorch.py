"""Built-in PyTorch architectures: a `.pth` upload names one of these, the demo trains one.

Every builder takes `(num_classes, in_channels, **kw)` and returns an untrained nn.Module whose
final classifier is an `nn.Linear` named `classifier` (pruning leaves it whole; `.pth` uploads
infer `num_classes` from its weight).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from optimization.base import InvalidInputError


def conv_bn_relu(cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1,
                 activation: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        activation(),
    )


class DigitsCNN(nn.Module):
    """Three conv-bn-relu blocks and a two-layer head for 8x8 digits (~360k parameters):
    big enough that quantization and pruning change the runtime, small enough to train in seconds."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 32, hidden: int = 512):
        super().__init__()
        self.features = nn.Sequential(
            conv_bn_relu(in_channels, width),
            conv_bn_relu(width, 2 * width),
            nn.MaxPool2d(2),
            conv_bn_relu(2 * width, 4 * width),
            nn.AdaptiveAvgPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * width * 4, hidden), nn.ReLU())
        self.classifier = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.head(self.features(x)))


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round channel counts to a multiple of 8, as MobileNetV2 does, never below 90% of `value`."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        layers = [conv_bn_relu(cin, hidden, 1, activation=nn.ReLU6)] if expand != 1 else []
        layers += [
            conv_bn_relu(hidden, hidden, 3, stride, groups=hidden, activation=nn.ReLU6),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x) if self.residual else self.block(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 (Sandler et al. 2018) with the CIFAR-style stem: the first two stride-2 stages
    keep stride 1 so 32x32 inputs still end at a 4x4 feature map."""

    # (expansion, output channels, repeats, first stride) at width 1.0, strides adapted for 32x32
    STAGES = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
              (6, 160, 3, 2), (6, 320, 1, 1))

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width_mult: float = 1.0,
                 last_channels: int = 1280):
        super().__init__()
        cin = make_divisible(32 * width_mult)
        layers: list[nn.Module] = [conv_bn_relu(in_channels, cin, 3, 1, activation=nn.ReLU6)]
        for expand, channels, repeats, stride in self.STAGES:
            cout = make_divisible(channels * width_mult)
            for i in range(repeats):
                layers.append(InvertedResidual(cin, cout, stride if i == 0 else 1, expand))
                cin = cout
        last = make_divisible(last_channels * max(1.0, width_mult))
        layers += [conv_bn_relu(cin, last, 1, activation=nn.ReLU6), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(last, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            conv_bn_relu(cin, cout, 3, stride),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False),
            nn.BatchNorm2d(cout),
        )
        self.shortcut = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout else nn.Identity()
        )
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.body(x) + self.shortcut(x))


class ResNetSmall(nn.Module):
    """CIFAR ResNet (He et al. 2016): three stages of `blocks_per_stage` basic blocks,
    16/32/64 channels; blocks_per_stage=1 is ResNet-8, 3 is ResNet-20."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, blocks_per_stage: int = 1,
                 base_width: int = 16):
        super().__init__()
        layers: list[nn.Module] = [conv_bn_relu(in_channels, base_width)]
        cin = base_width
        for stage in range(3):
            cout = base_width * 2 ** stage
            for i in range(blocks_per_stage):
                layers.append(BasicBlock(cin, cout, 2 if stage > 0 and i == 0 else 1))
                cin = cout
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "digits_cnn": DigitsCNN,
    "mobilenet_v2": MobileNetV2,
    "resnet_small": ResNetSmall,
}


def build(name: str, num_classes: int, in_channels: int, **kw) -> nn.Module:
    if name not in ARCHITECTURES:
        raise InvalidInputError(
            f"unknown architecture {name!r}; the built-in ones are {', '.join(sorted(ARCHITECTURES))}"
        )
    module = ARCHITECTURES[name](num_classes, in_channels, **kw)
    module.zoo_kwargs = dict(kw)  # recorded in saved .pt2 files so they load back as this class
    return module


# Two builds with different class and channel counts tell which dimensions follow each.
_PROBES = ({"num_classes": 11, "in_channels": 5}, {"num_classes": 13, "in_channels": 7})


def state_dict_layouts() -> dict[str, dict[str, list]]:
    """{architecture: {state_dict key: shape}} for every built-in architecture, a dimension
    that follows the dataset written "num_classes" or "in_channels": what
    `layouts.STATE_DICT_LAYOUTS` holds for the web process, which cannot import torch."""
    layouts = {}
    for name in sorted(ARCHITECTURES):
        first, second = ({k: tuple(v.shape) for k, v in build(name, **probe).state_dict().items()}
                         for probe in _PROBES)
        layouts[name] = {
            key: [a if a == b else next(symbol for symbol in _PROBES[0] if _PROBES[0][symbol] == a
                                        and _PROBES[1][symbol] == b)
                  for a, b in zip(shape, second[key])]
            for key, shape in first.items()
        }
    return layouts


if __name__ == "__main__":  # python -m optimization.zoo.pytorch: rewrite the layouts file
    import json

    from optimization.zoo.layouts import LAYOUTS_FILE

    blocks = [f"  {json.dumps(name)}: {{\n" + ",\n".join(
        f"    {json.dumps(key)}: {json.dumps(shape)}" for key, shape in layout.items()) + "\n  }"
        for name, layout in state_dict_layouts().items()]
    LAYOUTS_FILE.write_text("{\n" + ",\n".join(blocks) + "\n}\n")
    print(f"wrote {LAYOUTS_FILE}")
