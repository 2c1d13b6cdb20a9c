"""Quantization-aware training with tfmot (fake-quant INT8 during fine-tuning), converted to
a real full-integer INT8 `.tflite`. When tfmot cannot quantize the whole model, the layers
its default registry supports are annotated one by one, with the BatchNorms it folds into
their convs and the outputs of the other layers without trainable weights (a Normalization,
a Rescaling); the details list the layers left in float. An adapted Normalization (with the
Rescaling before it) is first rewritten as one per-channel affine op (`_common.normalization_as_affine`
says why), so it is quantized as PTQ INT8 quantizes it.

Activation ranges start from the float network's on the calibration samples, not tfmot's
[-6, 6] (`_common.quantize_aware` and `calibrate_activation_ranges`, which say why). Weights are per tensor by default
(`weight_granularity`): the per-channel file stores a float32 scale and an int64 zero point
per channel of every weight and bias (see ptq_int8), a quarter of a thin MobileNet's INT8 file
(MobileNetV2 alpha 0.35 in BENCHMARKS.md: 2.62x smaller than FP32 per channel, 3.59x per
tensor, PTQ INT8's per-tensor file 3.60x); fine-tuning with the per-tensor grid in place
recovers what the coarser scales cost.
"""
from __future__ import annotations

from pathlib import Path

from optimization.base import BaseOptimization, OptimizedResult, TechniqueConfig
from optimization.techniques.tensorflow._common import (
    QAT_CONVERSION, QAT_SETUP, normalization_as_affine, quantize_aware)

def per_tensor_scheme():
    """tfmot's 8-bit scheme with one scale per weight tensor (its default 8-bit scheme is
    per channel for convolutions)."""
    from tensorflow_model_optimization.python.core.quantization.keras.experimental.default_n_bit import (
        default_n_bit_quantize_scheme)

    return default_n_bit_quantize_scheme.DefaultNBitQuantizeScheme(
        disable_per_axis=True, num_bits_weight=8, num_bits_activation=8)


class Technique(BaseOptimization):
    name = "qat"
    framework = "tensorflow"

    def estimate_time(self, model_info: dict, config: TechniqueConfig) -> float:
        from optimization.backends.tensorflow import conversion_seconds, training_seconds

        return (training_seconds(model_info, self.options(config)["epochs"], setup=QAT_SETUP)
                + QAT_CONVERSION * conversion_seconds(model_info))

    def optimize(self, model, config, dataset, progress) -> OptimizedResult:
        from optimization.backends.tensorflow import convert_to_tflite, fit, technique_result

        options = self.options(config)
        per_channel = options["weight_granularity"] == "per_channel"
        progress(0.0, "inserting fake-quantization", {})
        trainee, folded = normalization_as_affine(model.module, dataset.x_calib)
        quantized, not_annotated = quantize_aware(trainee, dataset.x_calib,
                                                  None if per_channel else per_tensor_scheme())
        epochs = int(options["epochs"])
        fit(quantized, dataset.x_train, dataset.y_train, epochs, progress,
            learning_rate=float(options["learning_rate"]), batch_size=int(options["batch_size"]),
            span=(0.05, 0.85), message="quantization-aware fine-tuning", seed=config.seed)
        progress(0.85, "converting to INT8 .tflite", {})
        deploy = convert_to_tflite(quantized, Path(config.output_dir) / f"{self.name}.tflite",
                                   dataset.x_calib, per_channel=per_channel)
        details = {"weights_bits": 8, "activations_bits": 8,
                   "weight_granularity": options["weight_granularity"],
                   "layers_not_annotated": not_annotated,
                   "activation_ranges": f"calibrated on {len(dataset.x_calib)} samples before "
                                        "fine-tuning (tfmot's own start: [-6, 6])",
                   "native_note": "the .keras file holds the QAT model; load it inside "
                                  "tfmot.quantization.keras.quantize_scope()"}
        if folded:
            details["normalization_as_affine"] = folded
        return technique_result(self.name, config, quantized, deploy, details,
                                counted_model=model.module, preparation=model.preparation).record(
            precision="int8", epochs=epochs, calibration_samples=len(dataset.x_calib)).record_weight_bits()


