"""Quantization-aware training with tfmot (fake-quant INT8 during fine-tuning), converted to
a real full-integer INT8 `.tflite`. When tfmot cannot quantize the whole model, only the
layers its default registry supports are annotated; the details list the others.

tfmot starts every activation range at [-6, 6] and moves it as an exponential moving average
with decay 0.999, so a fine-tune of a few hundred steps ends with ranges still near [-6, 6]
(measured on MobileNetV2 after 90 steps: a ReLU6 output seen in [0, 4.5] was quantized over
[-5.5, 5.9], half of its 256 levels unused). `quantize_aware` therefore sets each range from
the calibration samples first, as post-training quantization does, and fine-tuning starts
from PTQ's grid.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from optimization.base import BaseOptimization, OptimizedResult, TechniqueConfig

# MovingAverageQuantizer's decay, fixed inside tfmot (quantizers.py); the calibration reads the
# range each sample batch moved the average towards through it
TFMOT_EMA_DECAY = 0.999
CALIBRATION_BATCH = 64
# a second round measures each range with the ranges before it already calibrated
CALIBRATION_ROUNDS = 2


# timed: building the fake-quant model and its train step takes ~3x a plain model's, and
# converting it ~3x a plain conversion
QAT_SETUP = 3.0
QAT_CONVERSION = 3.0


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
        progress(0.0, "inserting fake-quantization", {})
        quantized, not_annotated = quantize_aware(model.module, dataset.x_calib)
        epochs = int(options["epochs"])
        fit(quantized, dataset.x_train, dataset.y_train, epochs, progress,
            learning_rate=float(options["learning_rate"]), batch_size=int(options["batch_size"]),
            span=(0.05, 0.85), message="quantization-aware fine-tuning", seed=config.seed)
        progress(0.85, "converting to INT8 .tflite", {})
        deploy = convert_to_tflite(quantized, Path(config.output_dir) / f"{self.name}.tflite",
                                   dataset.x_calib)
        details = {"weights_bits": 8, "activations_bits": 8,
                   "layers_not_annotated": not_annotated,
                   "activation_ranges": f"calibrated on {len(dataset.x_calib)} samples before "
                                        "fine-tuning (tfmot's own start: [-6, 6])",
                   "native_note": "the .keras file holds the QAT model; load it inside "
                                  "tfmot.quantization.keras.quantize_scope()"}
        return technique_result(self.name, config, quantized, deploy, details,
                                counted_model=model.module).record(
            precision="int8", epochs=epochs, calibration_samples=len(dataset.x_calib)).record_weight_bits()


def quantize_aware(keras_model, calibration_x, scheme=None):
    """The tfmot QAT model with its activation ranges calibrated on `calibration_x`; falls back
    to annotating only supported layers. Returns the model and the names of layers left in
    float."""
    quantized, not_annotated = _annotate_and_apply(keras_model, scheme)
    calibrate_activation_ranges(quantized, calibration_x)
    return quantized, not_annotated


def _annotate_and_apply(keras_model, scheme):
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


def calibrate_activation_ranges(model, x) -> int:
    """Set every moving-average range of the QAT `model` to the min / max its tensor takes on
    `x` (in training mode, as fine-tuning sees it). Each batch's forward pass moves a range
    towards that batch's extremes by 1 - TFMOT_EMA_DECAY; the extremes are read back from the
    move, the state the pass changed (ranges, BatchNorm statistics) is put back, and the widest
    extremes over all batches are assigned. The other quantizers' variables (weight ranges, set
    from the weights on every step; the input layer's all-values range) keep what the pass set.
    Returns the number of ranges set."""
    ranges, other_quantizer_vars = _quantizer_variables(model)
    owned = {variable.ref() for pair in ranges for variable in pair} | {v.ref() for v in other_quantizer_vars}
    # a forward pass changes no trainable weight: only these need putting back
    moved = [variable for variable in model.non_trainable_weights if variable.ref() not in owned]
    moved_values = [variable.numpy() for variable in moved]
    x = np.asarray(x, dtype=np.float32)
    for _ in range(CALIBRATION_ROUNDS):
        before = [(low_var.numpy(), high_var.numpy()) for low_var, high_var in ranges]
        low = [np.inf] * len(ranges)
        high = [-np.inf] * len(ranges)
        for start in range(0, len(x), CALIBRATION_BATCH):
            model(x[start:start + CALIBRATION_BATCH], training=True)
            for index, ((low_var, high_var), (low_before, high_before)) in enumerate(zip(ranges, before)):
                low[index] = np.minimum(low[index], _ema_target(low_var.numpy(), low_before))
                high[index] = np.maximum(high[index], _ema_target(high_var.numpy(), high_before))
                low_var.assign(low_before)
                high_var.assign(high_before)
            for variable, value in zip(moved, moved_values):
                variable.assign(value)
        for (low_var, high_var), low_value, high_value in zip(ranges, low, high):
            low_var.assign(np.asarray(low_value, dtype=np.float32).reshape(low_var.shape))
            high_var.assign(np.asarray(high_value, dtype=np.float32).reshape(high_var.shape))
    return len(ranges)


def _ema_target(after: np.ndarray, before: np.ndarray) -> np.ndarray:
    return (after.astype(np.float64) - TFMOT_EMA_DECAY * before) / (1 - TFMOT_EMA_DECAY)


def _quantizer_variables(model) -> tuple[list[tuple], list]:
    """([(min, max) of each moving-average range], [every other quantizer variable]) in the
    (possibly nested) QAT `model`."""
    from tensorflow_model_optimization.python.core.quantization.keras import (
        quantize_layer, quantize_wrapper, quantizers)

    from optimization.backends.tensorflow import leaf_layers

    ranges, others = [], []

    def add(quantizer, variables):
        if not variables:
            return
        if isinstance(quantizer, quantizers.MovingAverageQuantizer):
            ranges.append((variables["min_var"], variables["max_var"]))
        else:
            others.extend(value for value in variables.values() if hasattr(value, "assign"))

    for layer in leaf_layers(model):
        if isinstance(layer, quantize_layer.QuantizeLayer):
            add(layer.quantizer, getattr(layer, "quantizer_vars", None))
        elif isinstance(layer, quantize_wrapper.QuantizeWrapper):
            for _, quantizer, variables in layer._weight_vars:
                add(quantizer, variables)
            for activation in layer._quantize_activations:
                for name in ("_pre_activation_vars", "_post_activation_vars"):
                    add(activation.quantizer, getattr(activation, name, None))
            if layer._output_quantizers:
                add(layer._output_quantizers[0], layer._output_quantizer_vars)
    return ranges, others
