"""Post-training static INT8 quantization in onnxruntime (QDQ, per-channel weights), calibrated
on the calibration split. Static, not dynamic: dynamic quantization re-measures activations on
every call and made convolutional models slower, not faster."""
from __future__ import annotations

from optimization.techniques.pytorch._common import PyTorchTechnique, file_size, quantize_model_int8


class Technique(PyTorchTechnique):
    name = "ptq_int8"
    post_training = True

    def estimate_time(self, model_info, config) -> float:
        return 2 * self.quantize_seconds(model_info)

    def optimize(self, model, config, dataset, progress):
        deploy, _ = self.paths(config)
        progress(0.05, "exporting FP32 ONNX and calibrating INT8 ranges", {})
        quantize_model_int8(model, deploy, dataset.x_calib)
        progress(0.6, "saving the native model", {"size_bytes": file_size(deploy)})
        details = {
            "bits": 8, "format": "ONNX QDQ", "weights": "int8 per-channel, symmetric",
            "activations": "uint8 per-tensor, MinMax calibration",
            "calibration_samples": int(len(dataset.x_calib)),
            "native": "FP32 .pt2: onnxruntime's quantized model exists only as ONNX",
        }
        result = self.result(config, model, model.module, details, deploy_written=True)
        progress(1.0, "INT8 model written", {"size_bytes": file_size(deploy)})
        return result
