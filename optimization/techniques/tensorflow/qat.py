"""Quantization-aware training with tfmot (fake-quant INT8 during fine-tuning), converted to
a real full-integer INT8 `.tflite`. When tfmot cannot quantize the whole model, only the
layers its default registry supports are annotated; the details list the others."""
from __future__ import annotations

from pathlib import Path

from optimization.base import BaseOptimization, OptimizedResult, TechniqueConfig


# timed: building the fake-quant model and its train step takes ~3x a plain model's, and
# converting it ~3x a plain conversion
QAT_SETUP = 3.0
QAT_CONVERSION = 3.0


class Technique(BaseOptimization):
    name = "qat"
    framework = "tensorflow"
    defaults = {"epochs": 2, "learning_rate": 1e-4, "batch_size": 32}

    def estimate_time(self, model_info: dict, config: TechniqueConfig) -> float:
        from optimization.backends.tensorflow import conversion_seconds, training_seconds

        return (training_seconds(model_info, self.options(config)["epochs"], setup=QAT_SETUP)
                + QAT_CONVERSION * conversion_seconds(model_info))

    def optimize(self, model, config, dataset, progress) -> OptimizedResult:
        from optimization.backends.tensorflow import convert_to_tflite, fit, technique_result

        options = self.options(config)
        progress(0.0, "inserting fake-quantization", {})
        quantized, not_annotated = quantize_aware(model.module)
        epochs = int(options["epochs"])
        fit(quantized, dataset.x_train, dataset.y_train, epochs, progress,
            learning_rate=float(options["learning_rate"]), batch_size=int(options["batch_size"]),
            span=(0.05, 0.85), message="quantization-aware fine-tuning", seed=config.seed)
        progress(0.85, "converting to INT8 .tflite", {})
        deploy = convert_to_tflite(quantized, Path(config.output_dir) / f"{self.name}.tflite",
                                   dataset.x_calib)
        details = {"precision": "int8", "epochs": epochs, "weights_bits": 8, "activations_bits": 8,
                   "layers_not_annotated": not_annotated,
                   "native_note": "the .keras file holds the QAT model; load it inside "
                                  "tfmot.quantization.keras.quantize_scope()"}
        return technique_result(self.name, config, quantized, deploy, details,
                                counted_model=model.module)


def quantize_aware(keras_model, scheme=None):
    """The tfmot QAT model; falls back to annotating only supported layers. Returns the model
    and the names of layers left in float."""
    import tensorflow_model_optimization as tfmot
    from tensorflow_model_optimization.python.core.quantization.keras.default_8bit import (
        default_8bit_quantize_registry)

    from optimization.backends.tensorflow import keras

    quantization = tfmot.quantization.keras
    scheme_args = (scheme,) if scheme is not None else ()
    try:
        return quantization.quantize_apply(quantization.quantize_annotate_model(keras_model),
                                           *scheme_args), []
    except (ValueError, RuntimeError):
        registry = default_8bit_quantize_registry.Default8BitQuantizeRegistry()
        skipped = [layer.name for layer in keras_model.layers
                   if not registry.supports(layer) and not isinstance(layer, keras.layers.InputLayer)]

        def annotate(layer):
            clone = layer.__class__.from_config(layer.get_config())
            return quantization.quantize_annotate_layer(clone) if registry.supports(layer) else clone

        annotated = keras.models.clone_model(keras_model, clone_function=annotate)
        annotated.set_weights(keras_model.get_weights())
        return quantization.quantize_apply(annotated, *scheme_args), skipped
