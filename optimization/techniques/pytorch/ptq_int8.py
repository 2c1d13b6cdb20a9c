"""Post-training static INT8 quantization in onnxruntime, calibrated on the calibration split:
signed symmetric weights, unsigned per-tensor activations (see quantize_int8 for the file format
and the per-channel / per-tensor choice). Static, not dynamic: dynamic quantization re-measures
activations on every call and made convolutional models slower, not faster."""
from __future__ import annotations

from optimization.techniques.pytorch._common import (
    PyTorchTechnique,
    file_size,
    int8_options,
    quantize_model_int8,
)


class Technique(PyTorchTechnique):
    name = "ptq_int8"
    post_training = True

    def estimate_time(self, model_info, config) -> float:
        return self.quantize_seconds(model_info, self.options(config))

    def optimize(self, model, config, dataset, progress):
        quantization = int8_options(self.options(config))
        deploy, _ = self.paths(config)
        progress(0.05, "exporting FP32 ONNX and calibrating INT8 ranges", {})
        chosen = quantize_model_int8(model, deploy, dataset.x_calib, **quantization)
        progress(0.6, "saving the native model", {"size_bytes": file_size(deploy)})
        details = {
            "bits": 8, **chosen, "weights": "int8 symmetric",
            "activations": "uint8 per-tensor, MinMax calibration",
            "calibration_samples": int(len(dataset.x_calib)),
            "native": "FP32 .pt2: onnxruntime's quantized model exists only as ONNX",
        }
        result = self.result(config, model, model.module, details, deploy_written=True)
        result.record(precision="int8", calibration_samples=int(len(dataset.x_calib))).record_weight_bits()
        progress(1.0, "INT8 model written", {"size_bytes": file_size(deploy)})
        return result
