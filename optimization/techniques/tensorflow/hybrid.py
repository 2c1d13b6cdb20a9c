"""Hybrid: (structured filter pruning ->) magnitude pruning -> pruning-preserving QAT -> INT8.

Structured pruning first (default: a quarter of the filters kept, fine-tuned as
prune_structured does) makes every tensor smaller, which is what shrinks the INT8 file;
magnitude pruning then zeroes half of what is left (layers under 1024 weights stay dense,
see `_common.MIN_PRUNED_LAYER_WEIGHTS`), and PQAT (tfmot's
Default8BitPrunePreserveQuantizeScheme) fine-tunes in INT8 without refilling those zeros, so
the sparsity survives into the INT8 `.tflite`, where compression shows it. Each stage reuses
the code of its own technique.
"""
from __future__ import annotations

from pathlib import Path

from optimization.base import BaseOptimization, OptimizedResult, TechniqueConfig
from optimization.techniques.tensorflow._common import (
    PRUNING_SETUP, QAT_CONVERSION, QAT_SETUP, narrowed_step_cost, normalization_as_affine,
    prune_filters_finetuned, prune_magnitude_finetuned, quantize_aware)


class Technique(BaseOptimization):
    name = "hybrid"
    framework = "tensorflow"
    # Budgets (catalog) chosen on MobileNetV2 (alpha 0.35, 32x32). "epochs" is the
    # magnitude-pruning stage's (50% sparsity on the thin network needs 10) and scales the others
    # unless they are given: the structured stage (prune_structured's fine-tuning: distilled from
    # the original, cosine rate) cuts to a quarter of the channels and needs 3x as long to come
    # back within 1 pt; PQAT settles in half as long.

    def options(self, config: TechniqueConfig) -> dict:
        options = super().options(config)
        epochs = int(options["epochs"])
        if options["structured_epochs"] is None:
            options["structured_epochs"] = 3 * epochs
        if options["qat_epochs"] is None:
            options["qat_epochs"] = max(1, epochs // 2)
        return options

    def estimate_time(self, model_info: dict, config: TechniqueConfig) -> float:
        from optimization.backends.tensorflow import conversion_seconds, training_seconds

        options = self.options(config)
        keep, structured = 1.0, 0.0
        if options["structured_first"]:
            keep = 1 - options["pruning_ratio"]
            structured = training_seconds(model_info, options["structured_epochs"],
                                          step=narrowed_step_cost(keep, options["distill"]))
        step = narrowed_step_cost(keep)
        return (structured
                + training_seconds(model_info, options["epochs"], setup=PRUNING_SETUP, step=step)
                + training_seconds(model_info, options["qat_epochs"], setup=QAT_SETUP, step=step)
                + QAT_CONVERSION * conversion_seconds(model_info))

    def optimize(self, model, config, dataset, progress) -> OptimizedResult:
        import tensorflow_model_optimization as tfmot

        from optimization.backends.tensorflow import (
            convert_to_tflite, fit, technique_result, tflite_int8_weight_sparsity)
        from optimization.evaluator import compressed_size

        options = self.options(config)
        details = {"stages": []}
        current = model.module
        if options["structured_first"]:
            stage = {**options, "epochs": options["structured_epochs"],
                     "learning_rate": options["structured_learning_rate"]}
            current, structured = prune_filters_finetuned(current, dataset, stage, progress,
                                                          span=(0.0, 0.5), seed=config.seed)
            details["stages"].append("structured filter pruning")
            details["structured"] = structured
        current, magnitude = prune_magnitude_finetuned(current, dataset, options, progress,
                                                       span=(0.5, 0.7), seed=config.seed)
        details["stages"].append("magnitude pruning")
        details["magnitude"] = magnitude

        progress(0.7, "pruning-preserving quantization-aware training", {})
        scheme = tfmot.experimental.combine.Default8BitPrunePreserveQuantizeScheme()
        qat_epochs = int(options["qat_epochs"])
        quantizable, folded = normalization_as_affine(current, dataset.x_calib)
        if folded:
            details["normalization_as_affine"] = folded
        try:
            quantized, not_annotated = quantize_aware(quantizable, dataset.x_calib, scheme)
        except ValueError as exc:
            # tfmot's prune-preserving scheme refuses a layer its registry does not know (it
            # did EfficientNet's Normalization before quantize_aware gave such layers an output
            # quantizer of their own): post-training INT8 of the pruned model keeps its zeros
            # as well, without the QAT fine-tuning.
            quantized, qat_epochs = quantizable, 0
            details["stages"].append("post-training INT8 (QAT not applicable)")
            details["qat_not_applicable"] = str(exc).split(". ")[0]
        else:
            fit(quantized, dataset.x_train, dataset.y_train, qat_epochs, progress,
                learning_rate=float(options["qat_learning_rate"]), cosine=True,
                batch_size=int(options["batch_size"]), span=(0.7, 0.9),
                message="pruning-preserving QAT", seed=config.seed)
            details["stages"].append("pruning-preserving QAT")
            details["layers_not_annotated"] = not_annotated

        progress(0.9, "converting to INT8 .tflite", {})
        deploy = convert_to_tflite(quantized, Path(config.output_dir) / f"{self.name}.tflite",
                                   dataset.x_calib)
        details.update(
            sparsity_before_int8=magnitude["sparsity"],
            size_note="size_bytes is the INT8 .tflite as downloaded; the zeros show only in "
                      "compressed_size_bytes (gzip -9)",
        )
        epochs = int(options["epochs"]) + qat_epochs + (
            int(options["structured_epochs"]) if options["structured_first"] else 0)
        return technique_result(self.name, config, quantized, deploy, details,
                                counted_model=current, preparation=model.preparation).record(
            precision="int8", sparsity=round(tflite_int8_weight_sparsity(deploy), 4),
            channels_kept=details["structured"]["channels_kept"] if options["structured_first"] else 1.0,
            epochs=epochs, calibration_samples=len(dataset.x_calib),
            compressed_size_bytes=compressed_size(deploy)).record_weight_bits()
