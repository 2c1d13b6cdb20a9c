"""Structured pruning with Torch-Pruning: whole channels (ranked by L2 magnitude, coupled layers
removed together through the dependency graph) leave the network, so the model really has fewer
parameters and MACs and runs faster; fine-tuned afterwards. The classifier keeps its outputs."""
from __future__ import annotations

from optimization.backends import pytorch as backend
from optimization.techniques.pytorch._common import (
    EXPORT_SECONDS,
    PyTorchTechnique,
    channels_kept,
    prune_channels,
    require_trainable,
)


class Technique(PyTorchTechnique):
    name = "prune_structured"

    def estimate_time(self, model_info, config) -> float:
        options = self.options(config)
        return (self.pruned_training_seconds(model_info, options["epochs"], options["pruning_ratio"])
                + 2 * EXPORT_SECONDS)

    def optimize(self, model, config, dataset, progress):
        require_trainable(model, self.name)
        options = self.options(config)
        params_before, macs_before = backend.count_params_macs(model.module, model.input_shape)
        progress(0.02, f"removing {options['pruning_ratio']:.0%} of the channels", {})
        module, channel_multiple = prune_channels(model.module, model.input_shape, options["pruning_ratio"],
                                                  options["channel_multiple"])
        params_after, macs_after = backend.count_params_macs(module, model.input_shape)
        accuracy_after_pruning = backend.evaluate(module, dataset.x_calib, dataset.y_calib)
        metrics = backend.train(module, dataset, options["epochs"], options["learning_rate"], progress,
                                (0.05, 0.9), seed=config.seed, cosine=True)
        progress(0.92, "exporting", {})
        details = {
            "pruning_ratio": options["pruning_ratio"], "channel_multiple": channel_multiple,
            "importance": "L2 magnitude (Torch-Pruning)",
            "params_before": params_before, "params_after": params_after,
            "macs_before": macs_before, "macs_after": macs_after,
            "learning_rate_schedule": "cosine decay to zero",
            "calibration_accuracy_before_fine_tuning": round(accuracy_after_pruning, 4),
            "final_train_loss": metrics.get("loss"),
            "architecture_unchanged": False,
        }
        result = self.result(config, model, module, details)
        result.record(precision="fp32", channels_kept=channels_kept(model.module, module), epochs=options["epochs"])
        progress(1.0, "pruned model written", {"params": params_after})
        return result
