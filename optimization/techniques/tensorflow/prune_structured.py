"""Structured (filter) pruning by surgery on the Keras graph: tfmot has no channel pruning.

Each prunable Conv2D / Dense keeps the filters with the largest L1 norm; the model is rebuilt
from its config with fewer filters, the kept weights are copied, and the layers downstream
(BatchNorm, depthwise convs, pooling, Flatten -> Dense) are narrowed to match. A layer whose
output reaches a merge (residual Add, Concatenate), a model output or a layer we do not know
keeps all its channels; the details say which and why. Then the model is fine-tuned with a
cosine-decayed rate, by default distilled from the unpruned model (its soft targets plus the
labels, distillation's train_step). (Ranking filters by their BatchNorm-folded norm instead
was tried on MobileNetV2 and recovered worse than the plain L1 norm.) The surgery lives in
`_common.py`: distillation's student and hybrid's first stage use it too.
"""
from __future__ import annotations

from pathlib import Path

from optimization.base import BaseOptimization, OptimizedResult, TechniqueConfig
from optimization.techniques.tensorflow._common import narrowed_step_cost, prune_filters_finetuned


class Technique(BaseOptimization):
    name = "prune_structured"
    framework = "tensorflow"

    def estimate_time(self, model_info: dict, config: TechniqueConfig) -> float:
        from optimization.backends.tensorflow import conversion_seconds, training_seconds

        options = self.options(config)
        step = narrowed_step_cost(1 - options["pruning_ratio"], options["distill"])
        return training_seconds(model_info, options["epochs"], step=step) + conversion_seconds(model_info)

    def optimize(self, model, config, dataset, progress) -> OptimizedResult:
        from optimization.backends.tensorflow import convert_to_tflite, technique_result

        pruned, details = prune_filters_finetuned(model.module, dataset, self.options(config),
                                                  progress, span=(0.05, 0.9), seed=config.seed)
        progress(0.9, "converting to .tflite", {})
        deploy = convert_to_tflite(pruned, Path(config.output_dir) / f"{self.name}.tflite")
        return technique_result(self.name, config, pruned, deploy, details,
                                preparation=model.preparation).record(
            precision="fp32", channels_kept=details.pop("channels_kept"), epochs=details.pop("epochs"))


