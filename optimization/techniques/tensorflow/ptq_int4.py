"""Post-training INT4 with the AI Edge Quantizer on the FP32 `.tflite`.

Default scheme `fc4_conv8`: 4-bit weights for fully connected layers (where most parameters
sit) and 8-bit for convolutions; activations are quantized on the fly (dynamic range), so
the integer kernels run. `all4` puts convolutions in 4 bits too: smaller, but LiteRT has
no faster 4-bit convolution kernel, so it is not faster and loses more accuracy.
"""
from __future__ import annotations

from pathlib import Path

from optimization.base import BaseOptimization, OptimizedResult, TechniqueConfig

SCHEMES = {"fc4_conv8": {"FULLY_CONNECTED": 4, "CONV_2D": 8, "DEPTHWISE_CONV_2D": 8},
           "all4": {"FULLY_CONNECTED": 4, "CONV_2D": 4, "DEPTHWISE_CONV_2D": 8}}
WHY_WIDER = {
    "CONV_2D": "8-bit: LiteRT has no faster 4-bit convolution kernel, and 4 bits cost more "
               "accuracy in convolutions than in fully connected layers",
    "DEPTHWISE_CONV_2D": "8-bit: the AI Edge Quantizer has no 4-bit depthwise convolution",
}
NOT_QUANTIZED = "float32: the quantizer does not quantize this op's weights"


class Technique(BaseOptimization):
    name = "ptq_int4"
    framework = "tensorflow"
    post_training = True
    defaults = {"scheme": "fc4_conv8"}

    def estimate_time(self, model_info: dict, config: TechniqueConfig) -> float:
        from optimization.backends.tensorflow import conversion_seconds

        # the FP32 conversion, then the quantizer's pass over the file
        return 1.1 * conversion_seconds(model_info)

    def optimize(self, model, config, dataset, progress) -> OptimizedResult:
        from ai_edge_quantizer import qtyping, quantizer

        from optimization.backends.tensorflow import (
            convert_to_tflite, technique_result, tflite_weights, write_bytes)

        scheme = self.options(config)["scheme"]
        if scheme not in SCHEMES:
            raise ValueError(f"ptq_int4 scheme must be one of {', '.join(SCHEMES)}, not {scheme!r}")
        output_dir = Path(config.output_dir)
        progress(0.1, "exporting the FP32 .tflite to quantize", {})
        float_path = convert_to_tflite(model.module, output_dir / f"{self.name}_fp32_source.tflite")
        progress(0.5, f"quantizing weights ({scheme})", {})
        engine = quantizer.Quantizer(float_path.read_bytes())
        for op_name, bits in SCHEMES[scheme].items():
            engine.add_dynamic_config(".*", qtyping.TFLOperationName[op_name], bits)
        quantized = engine.quantize(enable_progress_bar=False,
                                   enable_progress_report=False).quantized_model
        float_path.unlink()
        deploy = write_bytes(bytes(quantized), output_dir / f"{self.name}.tflite")
        layers = [{key: w[key] for key in ("op", "weight", "weight_bits")}
                  for w in tflite_weights(deploy)]
        details = {
            "precision": "int4",
            "scheme": scheme,
            "activations": "float32, quantized on the fly by the integer kernels (dynamic range)",
            "layers": layers,
            "kept_wider": [{**layer, "why": WHY_WIDER.get(layer["op"], NOT_QUANTIZED)
                            if layer["weight_bits"] == 8 else NOT_QUANTIZED}
                           for layer in layers if layer["weight_bits"] > 4],
            "native_note": "the .keras file is the unchanged FP32 model; INT4 lives in the .tflite",
        }
        return technique_result(self.name, config, model.module, deploy, details)

