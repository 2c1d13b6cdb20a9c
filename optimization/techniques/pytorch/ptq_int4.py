"""Post-training 4-bit weight quantization in onnxruntime.

scheme "fc4_conv8" (default): fully connected layers become MatMulNBits (4-bit blockwise weights,
a fast native kernel) and convolutions are INT8 as in ptq_int8 (same format and granularity
options): onnxruntime has no fast 4-bit convolution.
scheme "all4": every weight 4-bit QDQ (smallest file, but the CPU dequantizes 4-bit weights at run
time, which made a convnet several times slower).
"""
from __future__ import annotations

from optimization.base import TechniqueNotApplicable
from optimization.backends import pytorch as backend
from optimization.techniques.pytorch._common import (
    PyTorchTechnique,
    file_size,
    int8_options,
    quantize_int8,
    quantize_matmul_4bit,
    quantize_model_int8,
    weighted_ops,
)


class Technique(PyTorchTechnique):
    name = "ptq_int4"
    post_training = True

    def estimate_time(self, model_info, config) -> float:
        return 1.25 * self.quantize_seconds(model_info, self.options(config))

    def optimize(self, model, config, dataset, progress):
        options = self.options(config)
        mode = options["scheme"]
        quantization = int8_options(options)
        deploy, _ = self.paths(config)
        progress(0.05, f"exporting FP32 ONNX ({mode})", {})
        if mode == "all4":
            conv_quantization = quantize_model_int8(model, deploy, dataset.x_calib, weight_bits=4)
            layers = {"4-bit QDQ": sum(weighted_ops(deploy).values(), [])}
            kept_wider = {}
        else:
            fp32 = deploy.with_suffix(".fp32.onnx")
            fc4 = deploy.with_suffix(".fc4.onnx")
            backend.BACKEND.export_deploy(model, fp32)
            progress(0.3, "fully connected layers to 4-bit MatMulNBits", {})
            fully_connected = quantize_matmul_4bit(fp32, fc4, options["block_size"])
            if not fully_connected and not weighted_ops(fc4).get("MatMulNBits"):
                raise TechniqueNotApplicable("the model has no fully connected layer with constant weights to store in 4 bits")
            progress(0.5, "convolutions to INT8 (calibrating)", {})
            try:
                conv_quantization = quantize_int8(fc4, deploy, dataset.x_calib, **quantization)
            finally:
                fp32.unlink(missing_ok=True)
                fc4.unlink(missing_ok=True)
            ops = weighted_ops(deploy)
            layers = {"4-bit MatMulNBits": ops.get("MatMulNBits", [])}
            kept_wider = {name: "INT8: onnxruntime has no fast 4-bit convolution kernel"
                          for name in ops.get("Conv", []) + ops.get("QLinearConv", [])}
        progress(0.8, "saving the native model", {"size_bytes": file_size(deploy)})
        details = {
            "bits": 4, "scheme": mode, "layers": layers, "kept_wider": kept_wider,
            "convolutions": conv_quantization,
            "activations": "uint8, MinMax calibration",
            "block_size": options["block_size"] if mode == "fc4_conv8" else None,
            "native": "FP32 .pt2: the 4-bit model exists only as ONNX",
        }
        result = self.result(config, model, model.module, details, deploy_written=True)
        result.record(precision="int4", calibration_samples=int(len(dataset.x_calib))).record_weight_bits()
        progress(1.0, "4-bit model written", {"size_bytes": file_size(deploy)})
        return result
