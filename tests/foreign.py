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
FORMATS = ("pt2", "pt", "onnx-dynamo", "onnx-legacy")


def import_timm():
    """timm, after torchvision's operator schemas are declared (timm imports torchvision)."""
    import_torchvision()
    import timm

    return timm


def timm_model(name: str, num_classes: int, in_channels: int = 3, seed: int = 0) -> torch.nn.Module:
    timm = import_timm()
    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_channels)


def save(module: torch.nn.Module, input_shape: tuple, path: Path, file_format: str,
         batch_range: tuple[int, int] = (1, 1024)) -> Path:
    """Write `module` as a user would: `pt2` torch.export with Dim("batch", min, max); `pt`
    torch.jit.trace; `onnx-dynamo` the dynamo exporter (weights kept inside the file);
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
