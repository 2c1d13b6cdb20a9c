"""Global magnitude pruning: the smallest `target_sparsity` of all conv/linear weights (ranked
together across layers, torch.nn.utils.prune.global_unstructured) become zero, then fine-tuning
with the zeros held in place.

A dense ONNX file stores zeros like any other number, so the download is not smaller and
onnxruntime is not faster; the saving shows only after compression, reported as such.

An empty target_sparsity or epochs follows the model's parameter count, as in TensorFlow
(`catalog.pruning_by_size`); PyTorch's defaults stay 50% and 2 epochs, which global ranking
holds on its MobileNetV2 (BENCHMARKS.md)."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import prune

from optimization.base import TechniqueNotApplicable
from optimization.catalog import with_pruning_by_size
from optimization.backends import pytorch as backend
from optimization.evaluator import compressed_size
from optimization.techniques.pytorch._common import (
    EXPORT_SECONDS,
    PyTorchTechnique,
    copy_module,
    file_size,
    require_trainable,
)


def prune_globally(module, sparsity: float) -> dict:
    """Zero the smallest weights across every conv/linear layer; returns {(layer, "weight"):
    mask} so training can keep the zeros, with the weights already made permanent
    (prune.remove: plain parameters again, exportable)."""
    targets = [(m, "weight") for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    if not targets:
        raise TechniqueNotApplicable("the model has no Conv2d/Linear layers to prune")
    prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=sparsity)
    masks = {}
    for layer, name in targets:
        masks[(layer, name)] = getattr(layer, f"{name}_mask").detach().clone()
        prune.remove(layer, name)
    return masks


def keep_zeros(masks: dict):
    """After each optimizer step, put the pruned weights back to zero (Adam's momentum moves them)."""
    def apply() -> None:
        with torch.no_grad():
            for (layer, name), mask in masks.items():
                getattr(layer, name).mul_(mask)
    return apply


def sparsity_of(masks: dict) -> float:
    total = sum(mask.numel() for mask in masks.values())
    return float(sum(int((mask == 0).sum()) for mask in masks.values()) / max(total, 1))


class Technique(PyTorchTechnique):
    name = "prune_unstructured"

    def estimate_time(self, model_info, config) -> float:
        options = with_pruning_by_size(self.options(config), model_info.get("params") or 0)
        return self.training_seconds(model_info, options["epochs"]) + 3 * EXPORT_SECONDS

    def optimize(self, model, config, dataset, progress):
        require_trainable(model, self.name)
        module = copy_module(model)
        options = with_pruning_by_size(self.options(config), sum(p.numel() for p in module.parameters()))
        progress(0.02, f"pruning {options['target_sparsity']:.0%} of the weights by magnitude", {})
        masks = prune_globally(module, options["target_sparsity"])
        accuracy_after_pruning = backend.evaluate(module, dataset.x_calib, dataset.y_calib)
        metrics = backend.train(module, dataset, options["epochs"], options["learning_rate"], progress,
                                (0.05, 0.85), seed=config.seed, after_step=keep_zeros(masks))
        progress(0.88, "exporting", {})
        deploy, _ = self.paths(config)
        baseline = deploy.with_suffix(".dense-baseline.onnx")
        backend.export_onnx(model.module, model.input_shape, baseline)
        baseline_compressed = compressed_size(baseline)
        baseline.unlink()
        details = {
            "target_sparsity": options["target_sparsity"],
            "calibration_accuracy_before_fine_tuning": round(accuracy_after_pruning, 4),
            "final_train_loss": metrics.get("loss"),
            "note": "masks only: the dense ONNX keeps every weight (zeros included), so its size and "
                    "speed match the baseline; the saving shows compressed",
            **({"size_choice": options["size_choice"]} if options["size_choice"] else {}),
        }
        result = self.result(config, model, module, details)
        details.update({
            "dense_size_bytes": file_size(deploy),
            "compressed_size_bytes": compressed_size(deploy),
            "baseline_compressed_size_bytes": baseline_compressed,
            "compression": "gzip -9 of the ONNX file",
        })
        result.record(precision="fp32", sparsity=round(sparsity_of(masks), 4), epochs=options["epochs"],
                      compressed_size_bytes=details["compressed_size_bytes"])
        progress(1.0, "pruned model written", {"sparsity": result.sparsity})
        return result
