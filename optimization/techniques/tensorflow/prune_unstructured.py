"""Unstructured magnitude pruning with tfmot: PolynomialDecay to the target sparsity while
fine-tuning, then `strip_pruning`. The zeros only pay off after compression (or in a sparse
runtime): the dense `.tflite` is NOT smaller; the gzip size shows the gain and is labelled so.
"""
from __future__ import annotations

import math
from pathlib import Path

from optimization.base import BaseOptimization, OptimizedResult, TechniqueConfig, TechniqueNotApplicable


# wrapping every layer for pruning makes building the train step ~4x as long (timed)
PRUNING_SETUP = 4.0


class Technique(BaseOptimization):
    name = "prune_unstructured"
    framework = "tensorflow"

    def estimate_time(self, model_info: dict, config: TechniqueConfig) -> float:
        from optimization.backends.tensorflow import conversion_seconds, training_seconds

        return (training_seconds(model_info, self.options(config)["epochs"], setup=PRUNING_SETUP)
                + conversion_seconds(model_info))

    def optimize(self, model, config, dataset, progress) -> OptimizedResult:
        from optimization.backends.tensorflow import convert_to_tflite, technique_result
        from optimization.evaluator import compressed_size

        options = self.options(config)
        pruned, details = prune_magnitude_finetuned(model.module, dataset, options, progress,
                                                    span=(0.0, 0.9), seed=config.seed)
        progress(0.9, "converting to .tflite", {})
        deploy = convert_to_tflite(pruned, Path(config.output_dir) / f"{self.name}.tflite")
        details.update(
            precision="fp32",
            dense_size_bytes=deploy.stat().st_size,
            compressed_size_bytes=compressed_size(deploy),
            size_note="the dense .tflite stores every zero, so it is NOT smaller than the "
                      "original; the gain shows in compressed_size_bytes (gzip -9) or a sparse runtime",
        )
        return technique_result(self.name, config, pruned, deploy, details).record(
            precision="fp32", sparsity=details.pop("sparsity"), epochs=details.pop("epochs"),
            compressed_size_bytes=details.pop("compressed_size_bytes"))


def prune_magnitude_finetuned(keras_model, dataset, options: dict, progress, span, seed=0):
    """Magnitude-prune every prunable layer to `target_sparsity` while fine-tuning; return the
    stripped (plain Keras) model and what was reached."""
    import tensorflow_model_optimization as tfmot

    from optimization.backends.tensorflow import fit, nonzero_fraction

    target = float(options["target_sparsity"])
    if not 0.0 < target < 1.0:
        raise ValueError(f"target_sparsity must be between 0 and 1, not {target}")
    epochs, batch_size = int(options["epochs"]), int(options["batch_size"])
    steps = epochs * math.ceil(len(dataset.x_train) / batch_size)
    # reach the target after ~70% of the steps (in 10 increments), then recover at that sparsity
    frequency = max(1, int(0.7 * steps) // 10)
    end_step = frequency * min(10, max(0, (steps - 1) // frequency))
    schedule = tfmot.sparsity.keras.PolynomialDecay(
        initial_sparsity=0.0, final_sparsity=target, begin_step=0, end_step=end_step,
        frequency=frequency)
    try:
        wrapped = tfmot.sparsity.keras.prune_low_magnitude(keras_model, pruning_schedule=schedule)
    except ValueError as error:
        raise TechniqueNotApplicable(f"tfmot cannot prune this model: {error}") from error
    fit(wrapped, dataset.x_train, dataset.y_train, epochs, progress,
        learning_rate=float(options["learning_rate"]), batch_size=batch_size, span=span,
        message=f"pruning to {target:.0%} sparsity", seed=seed,
        callbacks=[tfmot.sparsity.keras.UpdatePruningStep()])
    stripped = tfmot.sparsity.keras.strip_pruning(wrapped)
    return stripped, {"target_sparsity": target, "sparsity": round(1 - nonzero_fraction(stripped), 4),
                      "sparsity_scope": "kernels of conv and dense layers", "epochs": epochs}
