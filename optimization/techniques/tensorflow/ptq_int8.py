"""Post-training full-integer INT8: the converter calibrates activation ranges on samples from
the training split and writes every op in INT8 (float32 input and output, see the backend).

Weights get one scale per output channel (the converter's default), or one per tensor. Per
channel is the safe choice for accuracy, but TFLite stores a float32 scale and an int64 zero
point for every channel of every weight and of its int32 bias: 24 bytes a channel, a quarter
of the file of a thin, channel-rich network such as MobileNetV2 at width 0.35. `weight_granularity`
"auto" (the default) therefore also converts per tensor and keeps that file when it is
markedly smaller and loses at most `auto_max_drop_pts` accuracy against the per-channel file
on the training split; the test split is never looked at.
"""
from __future__ import annotations

from pathlib import Path

from optimization.base import BaseOptimization, OptimizedResult, TechniqueConfig
from optimization.techniques.tensorflow._common import (
    normalization_as_affine, smaller_unless_less_accurate)


class Technique(BaseOptimization):
    name = "ptq_int8"
    framework = "tensorflow"
    post_training = True

    def estimate_time(self, model_info: dict, config: TechniqueConfig) -> float:
        from optimization.backends.tensorflow import conversion_seconds

        conversions = 2 if self.options(config)["weight_granularity"] == "auto" else 1
        return conversions * conversion_seconds(model_info)

    def optimize(self, model, config, dataset, progress) -> OptimizedResult:
        from optimization.backends.tensorflow import convert_to_tflite, technique_result

        options = self.options(config)
        granularity = options["weight_granularity"]
        calibration_x = dataset.x_calib[:int(options["calibration_samples"])]
        output_dir = Path(config.output_dir)
        deploy = output_dir / f"{self.name}.tflite"
        progress(0.1, f"calibrating on {len(calibration_x)} samples and converting to INT8", {})
        converted, folded = normalization_as_affine(model.module, calibration_x)
        convert_to_tflite(converted, deploy, calibration_x, per_channel=granularity != "per_tensor")
        details = {"normalization_as_affine": folded} if folded else {}
        if granularity == "auto":
            progress(0.5, "converting with per-tensor weight scales to compare", {})
            per_tensor = convert_to_tflite(converted, output_dir / f"{self.name}_per_tensor.tflite",
                                           calibration_x, per_channel=False)
            granularity, details["granularity_choice"] = smaller_unless_less_accurate(
                deploy, per_tensor, dataset, float(options["auto_max_drop_pts"]))
            if granularity == "per_tensor":
                per_tensor.replace(deploy)
        progress(0.9, "saving the native model", {})
        details = {
            "precision": "int8",
            "weights_bits": 8,
            "activations_bits": 8,
            "weight_granularity": granularity,
            **details,
            "calibration_samples": len(calibration_x),
            "io": "float32 input and output (quantized inside), a drop-in for the FP32 file",
            "native_note": "the .keras file is the unchanged FP32 model; INT8 lives in the .tflite",
        }
        return technique_result(self.name, config, model.module, deploy, details,
                                preparation=model.preparation).record(
            precision="int8", calibration_samples=len(calibration_x)).record_weight_bits()
