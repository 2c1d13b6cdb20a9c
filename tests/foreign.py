"""Models nobody on the project wrote, saved the way their users save them: timm architectures
(random init) written as a `.pt2` with a dynamic batch, TorchScript `.pt`, and ONNX from both
torch exporters. Shared by the corpus tests and bench/corpus_pytorch.py.

timm and torchvision are test/bench-only dependencies, installed with --no-deps (see the
Makefile): torchvision's compiled operators are built for another torch, so its Python side is
imported after `onnx_to_torch.import_torchvision` declares the operator schemas it registers
kernels for.
"""
from __future__ import annotations

from pathlib import Path

import torch

from optimization.backends.onnx_to_torch import import_torchvision

# One of each family the hidden corpus names; the smallest variant timm has, random init.
ARCHITECTURES = {
    "mobilenetv3": "mobilenetv3_small_050",
    "lcnet": "lcnet_035",
    "ghostnet": "ghostnet_050",
    "regnet": "regnetx_002",
    "efficientnet": "tinynet_e",
    "resnet": "resnet10t",
    "convnext": "convnext_atto",
}
FORMATS = ("pt2", "pt", "pt-script", "onnx-dynamo", "onnx-legacy")


def import_timm():
    """timm, after torchvision's operator schemas are declared (timm imports torchvision)."""
    import_torchvision()
    import timm

    return timm


def timm_model(name: str, num_classes: int, in_channels: int = 3, seed: int = 0) -> torch.nn.Module:
    timm = import_timm()
    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_channels)


class LoopingCNN(torch.nn.Module):
    """Hand-written, with the control flow torch.jit.script keeps and torch.export cannot convert:
    a branch on the input's values (0-255 images scaled to [0, 1]; the stem is called inside
    both branches) and a weight-shared refinement block applied `steps` times in a loop."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 16, steps: int = 2):
        super().__init__()
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(in_channels, width, 3, stride=2, padding=1),
                                        torch.nn.BatchNorm2d(width), torch.nn.ReLU())
        self.refine = torch.nn.Sequential(torch.nn.Conv2d(width, width, 3, padding=1),
                                          torch.nn.BatchNorm2d(width), torch.nn.ReLU())
        self.steps = steps
        self.head = torch.nn.Linear(width, num_classes)

    def forward(self, x):
        if bool(x.max() > 1.0):
            x = self.stem(x / 255.0)
        else:
            x = self.stem(x)
        for _ in range(self.steps):
            x = x + self.refine(x)
        return self.head(x.mean((2, 3)))


def save(module: torch.nn.Module, input_shape: tuple, path: Path, file_format: str,
         batch_range: tuple[int, int] = (1, 1024)) -> Path:
    """Write `module` as a user would: `pt2` torch.export with Dim("batch", min, max); `pt`
    torch.jit.trace; `pt-script` torch.jit.script; `onnx-dynamo` the dynamo exporter (weights kept inside the file);
    `onnx-legacy` the TorchScript exporter with a dynamic batch axis."""
    module = module.eval()
    example = torch.randn(max(2, batch_range[0]), *input_shape)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    batch = torch.export.Dim("batch", min=batch_range[0], max=batch_range[1])
    if file_format == "pt2":
        torch.export.save(torch.export.export(module, (example,), dynamic_shapes=({0: batch},)), str(path))
    elif file_format == "pt":
        torch.jit.save(torch.jit.trace(module, example), str(path))
    elif file_format == "pt-script":
        torch.jit.save(torch.jit.script(module), str(path))
    elif file_format == "onnx-dynamo":
        torch.onnx.export(module, (example,), str(path), dynamo=True, external_data=False,
                          dynamic_shapes=({0: batch},), verbose=False)
    elif file_format == "onnx-legacy":
        torch.onnx.export(module, (example,), str(path), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    else:
        raise ValueError(f"unknown format {file_format!r}; one of {FORMATS}")
    return path


def suffix(file_format: str) -> str:
    return "." + file_format.split("-")[0]
