"""Hybrid: (structured filter pruning ->) magnitude pruning -> pruning-preserving QAT -> INT8.

Structured pruning first (default) makes every tensor smaller; magnitude pruning then zeroes
half of what is left, and PQAT (tfmot's Default8BitPrunePreserveQuantizeScheme) fine-tunes in
INT8 without refilling those zeros, so the sparsity survives into the INT8 `.tflite`, where
compression shows it. Each stage reuses the code of its own technique.
"""
from __future__ import annotations

from pathlib import Path

from optimization.base import BaseOptimization, OptimizedResult, TechniqueConfig
from optimization.techniques.tensorflow.prune_structured import prune_filters_finetuned
from optimization.techniques.tensorflow.prune_unstructured import prune_magnitude_finetuned
from optimization.techniques.tensorflow.qat import quantize_aware


class Technique(BaseOptimization):
    name = "hybrid"
    framework = "tensorflow"
    defaults = {"structured_first": True, "keep_fraction": 0.5, "target_sparsity": 0.5,
                "epochs": 2, "learning_rate": 1e-3, "qat_learning_rate": 1e-4, "batch_size": 32}

    def estimate_time(self, model_info: dict, config: TechniqueConfig) -> float:
        from optimization.backends.tensorflow import SECONDS_PER_CONVERSION, training_seconds

        options = self.options(config)
        macs = model_info.get("macs") or 1e6
        narrowed = {**model_info, "macs": macs * (options["keep_fraction"] ** 2
                                                 if options["structured_first"] else 1.0)}
        # filters, magnitude (wrappers ~2x a step), PQAT (fake-quant ~2x)
        stages = (1 if options["structured_first"] else 0) + 2 + 2
        return stages * training_seconds(narrowed, options["epochs"]) + 3 * SECONDS_PER_CONVERSION

    def optimize(self, model, config, dataset, progress) -> OptimizedResult:
        import tensorflow_model_optimization as tfmot

        from optimization.backends.tensorflow import (
            convert_to_tflite, fit, technique_result, tflite_int8_weight_sparsity)
        from optimization.evaluator import compressed_size

        options = self.options(config)
        details = {"precision": "int8", "stages": []}
        current = model.module
        if options["structured_first"]:
            current, structured = prune_filters_finetuned(current, dataset, options, progress,
                                                          span=(0.0, 0.3), seed=config.seed)
            details["stages"].append("structured filter pruning")
            details["structured"] = structured
        current, magnitude = prune_magnitude_finetuned(current, dataset, options, progress,
                                                       span=(0.3, 0.6), seed=config.seed)
        details["stages"].append("magnitude pruning")
        details["magnitude"] = magnitude

        progress(0.6, "pruning-preserving quantization-aware training", {})
        scheme = tfmot.experimental.combine.Default8BitPrunePreserveQuantizeScheme()
        quantized, not_annotated = quantize_aware(current, scheme)
        fit(quantized, dataset.x_train, dataset.y_train, int(options["epochs"]), progress,
            learning_rate=float(options["qat_learning_rate"]),
            batch_size=int(options["batch_size"]), span=(0.6, 0.9),
            message="pruning-preserving QAT", seed=config.seed)
        details["stages"].append("pruning-preserving QAT")
        details["layers_not_annotated"] = not_annotated

        progress(0.9, "converting to INT8 .tflite", {})
        deploy = convert_to_tflite(quantized, Path(config.output_dir) / f"{self.name}.tflite",
                                   dataset.x_calib)
        details.update(
            sparsity_before_int8=magnitude["sparsity"],
            sparsity_in_int8_file=round(tflite_int8_weight_sparsity(deploy), 4),
            compressed_size_bytes=compressed_size(deploy),
            size_note="size_bytes is the INT8 .tflite as downloaded; the zeros show only in "
                      "compressed_size_bytes (gzip -9)",
        )
        return technique_result(self.name, config, quantized, deploy, details,
                                counted_model=current)
