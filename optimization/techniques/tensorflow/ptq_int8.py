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
from optimization.techniques.tensorflow._common import normalization_as_affine

# "auto" takes per-tensor only for a real saving, not for a few bytes at any accuracy risk
AUTO_MIN_SAVING = 0.05
# the accuracy check runs on at most this many training samples
AUTO_CHECK_SAMPLES = 2000


class Technique(BaseOptimization):
    name = "ptq_int8"
    framework = "tensorflow"
    post_training = True

    def estimate_time(self, model_info: dict, config: TechniqueConfig) -> float:
        from optimization.backends.tensorflow import conversion_seconds

        conversions = 2 if self.options(config)["weight_granularity"] == "auto" else 1
        return conversions * conversion_seconds(model_info)

    def optimize(self, model, config, dataset, progress) -> OptimizedResult:
        from optimization.backends.tensorflow import BACKEND, convert_to_tflite, technique_result
        from optimization.evaluator import accuracy

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
            check_x = dataset.x_train[:AUTO_CHECK_SAMPLES]
            check_y = dataset.y_train[:AUTO_CHECK_SAMPLES]
            candidates = {"per_channel": deploy, "per_tensor": per_tensor}
            measured = {key: {"size_bytes": path.stat().st_size,
                              "train_accuracy": accuracy(BACKEND, path, check_x, check_y)}
                        for key, path in candidates.items()}
            saving = 1 - measured["per_tensor"]["size_bytes"] / measured["per_channel"]["size_bytes"]
            drop_pts = 100 * (measured["per_channel"]["train_accuracy"]
                              - measured["per_tensor"]["train_accuracy"])
            granularity = "per_tensor" if (saving >= AUTO_MIN_SAVING and
                                           drop_pts <= float(options["auto_max_drop_pts"])) \
                else "per_channel"
            if granularity == "per_tensor":
                per_tensor.replace(deploy)
            else:
                per_tensor.unlink()
            details["granularity_choice"] = {
                **measured, "per_tensor_saving": round(saving, 4),
                "per_tensor_drop_pts_on_train": round(drop_pts, 2),
                "rule": f"per tensor when >= {AUTO_MIN_SAVING:.0%} smaller and <= "
                        f"{float(options['auto_max_drop_pts'])} pt lower on {len(check_x)} "
                        "training samples (the test split is not used)",
            }
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
