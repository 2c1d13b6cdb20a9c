"""Unstructured magnitude pruning with tfmot: PolynomialDecay from 0 to the target sparsity
over the first 70% of the fine-tuning steps, the rest at that sparsity with the learning rate
cosine-decayed to zero, then `strip_pruning`. Unless given, the target sparsity and the epochs
follow the model's parameter count (`catalog.pruning_by_size`, shared with PyTorch; the details
say what was chosen and why). The zeros only pay off after compression (or in a sparse
runtime): the dense `.tflite` is NOT smaller; the gzip size shows the gain and is labelled so.
"""
from __future__ import annotations

from pathlib import Path

from optimization.base import BaseOptimization, OptimizedResult, TechniqueConfig
from optimization.catalog import with_pruning_by_size
from optimization.techniques.tensorflow._common import PRUNING_SETUP, prune_magnitude_finetuned


class Technique(BaseOptimization):
    name = "prune_unstructured"
    framework = "tensorflow"

    def estimate_time(self, model_info: dict, config: TechniqueConfig) -> float:
        from optimization.backends.tensorflow import conversion_seconds, training_seconds

        options = with_pruning_by_size(self.options(config), model_info.get("params") or 0)
        return (training_seconds(model_info, options["epochs"], setup=PRUNING_SETUP)
                + conversion_seconds(model_info))

    def optimize(self, model, config, dataset, progress) -> OptimizedResult:
        from optimization.backends.tensorflow import (
            convert_to_tflite, count_params_macs, technique_result)
        from optimization.evaluator import compressed_size

        options = with_pruning_by_size(self.options(config), count_params_macs(model.module)[0])
        pruned, details = prune_magnitude_finetuned(model.module, dataset, options, progress,
                                                    span=(0.0, 0.9), seed=config.seed, cosine=True)
        if options["size_choice"]:
            details["size_choice"] = options["size_choice"]
        progress(0.9, "converting to .tflite", {})
        deploy = convert_to_tflite(pruned, Path(config.output_dir) / f"{self.name}.tflite")
        details.update(
            precision="fp32",
            dense_size_bytes=deploy.stat().st_size,
            compressed_size_bytes=compressed_size(deploy),
            size_note="the dense .tflite stores every zero, so it is NOT smaller than the "
                      "original; the gain shows in compressed_size_bytes (gzip -9) or a sparse runtime",
        )
        return technique_result(self.name, config, pruned, deploy, details,
                                preparation=model.preparation).record(
            precision="fp32", sparsity=details.pop("sparsity"), epochs=details.pop("epochs"),
            compressed_size_bytes=details.pop("compressed_size_bytes"))


