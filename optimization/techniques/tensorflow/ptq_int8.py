"""Post-training full-integer INT8: the converter calibrates activation ranges on samples from
the training split and writes every op in INT8 (float32 input and output, see the backend)."""
from __future__ import annotations

from pathlib import Path

from optimization.base import BaseOptimization, OptimizedResult, TechniqueConfig


class Technique(BaseOptimization):
    name = "ptq_int8"
    framework = "tensorflow"
    post_training = True
    defaults = {"calibration_samples": 200}

    def estimate_time(self, model_info: dict, config: TechniqueConfig) -> float:
        from optimization.backends.tensorflow import SECONDS_PER_CONVERSION

        return 1.5 * SECONDS_PER_CONVERSION

    def optimize(self, model, config, dataset, progress) -> OptimizedResult:
        from optimization.backends.tensorflow import convert_to_tflite, technique_result

        samples = int(self.options(config)["calibration_samples"])
        calibration_x = dataset.x_calib[:samples]
        progress(0.1, f"calibrating on {len(calibration_x)} samples and converting to INT8", {})
        deploy = convert_to_tflite(model.module, Path(config.output_dir) / f"{self.name}.tflite",
                                   calibration_x)
        progress(0.9, "saving the native model", {})
        details = {
            "precision": "int8",
            "weights_bits": 8,
            "activations_bits": 8,
            "calibration_samples": len(calibration_x),
            "io": "float32 input and output (quantized inside), a drop-in for the FP32 file",
            "native_note": "the .keras file is the unchanged FP32 model; INT8 lives in the .tflite",
        }
        return technique_result(self.name, config, model.module, deploy, details)
