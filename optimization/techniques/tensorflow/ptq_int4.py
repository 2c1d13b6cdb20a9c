"""Post-training INT4 with the AI Edge Quantizer on the FP32 `.tflite`.

Default scheme `w4a8`: static quantization with 4-bit fully connected weights and int8
activations. LiteRT's XNNPACK delegate runs 4-bit weights only in FULLY_CONNECTED, W4A8
included; it never takes a CONV_2D with 4-bit weights, which then falls back to slow built-in
kernels and splits the graph. So first every pointwise convolution (1x1, stride 1) becomes the
FULLY_CONNECTED it equals on NHWC (`pointwise_convs_as_fully_connected`, exact), which puts
most of a MobileNet's weights in 4 bits. Everything else is W8A8; fully connected
layers with fewer than SMALL_LAYER_WEIGHTS weights stay 8-bit (the most sensitive, ~nothing to
save); input and output stay float32 like the INT8 file. The 8-bit weights take one scale per
tensor or per output channel as PTQ INT8's `weight_granularity` decides ("auto": per tensor
unless it costs accuracy on training samples; a layer whose channels differ in scale loses its
small channels to one scale per tensor). Weights are 4-bit per tensor with
the OCTAV clipping algorithm; activations are calibrated on up to REPRESENTATIVE_SAMPLES
calibration samples. Measured on the 2-core host, one LiteRT thread: MobileNetV2 alpha 0.35 at
32x32 is 6.0x smaller than FP32 (INT8: 3.6x) and as fast as INT8, ~1.5x faster than FP32 (its
int8 SOFTMAX stays on the built-in kernel, as in the INT8 file), accuracy kept; the digits CNN
is 6.2x smaller (INT8: 3.8x) and ~4x faster than FP32.

The earlier weight-only schemes stay available, with activations quantized on the fly
(dynamic range), without the rewrite: `fc4_conv8` (4-bit fully connected, 8-bit convolutions;
on MobileNetV2 its dynamic-range depthwise convolutions leave XNNPACK, 2x slower than FP32)
and `all4` (4-bit convolutions too: smaller, but those convolutions leave XNNPACK and run
several times slower, and lose more accuracy).
"""
from __future__ import annotations

import os
import re
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from optimization.base import BaseOptimization, OptimizedResult, TechniqueConfig
from optimization.techniques.tensorflow._common import diagnostic, smaller_unless_less_accurate

# w4a8: static (calibrated int8 activations), its pointwise convolutions rewritten as
# FULLY_CONNECTED, small ones kept 8-bit (see quantize_w4a8); the others: weight-only, dynamic
# range, with their weight bits by op
STATIC_SCHEME = "w4a8"
WEIGHT_ONLY_SCHEMES = {"fc4_conv8": {"FULLY_CONNECTED": 4, "CONV_2D": 8, "DEPTHWISE_CONV_2D": 8},
                       "all4": {"FULLY_CONNECTED": 4, "CONV_2D": 4, "DEPTHWISE_CONV_2D": 8}}
SCHEMES = (STATIC_SCHEME, *WEIGHT_ONLY_SCHEMES)
# fully connected layers with fewer weights stay 8-bit in w4a8: on MobileNetV2 0.35 the first
# blocks' pointwise layers, where 4 bits cost the most accuracy, for ~5 kB
SMALL_LAYER_WEIGHTS = 2048
WHY_WIDER = {
    "CONV_2D": "8-bit: XNNPACK has no int4 convolution kernel; a 4-bit CONV_2D would leave the "
               "delegate",
    "DEPTHWISE_CONV_2D": "8-bit: the AI Edge Quantizer has no 4-bit depthwise convolution",
    "FULLY_CONNECTED": f"8-bit: fewer than {SMALL_LAYER_WEIGHTS} weights, where 4 bits cost the "
                       "most accuracy for ~nothing saved",
}
NOT_QUANTIZED = "float32: the quantizer does not quantize this op's weights"
# w4a8 calibration runs the float file once per sample and keeps every tensor: timed on the
# 2-core host with 200 samples at 0.6 s for the digits demo (8 kernels) and 2.6 s (2 threads;
# 3.6 s on one) for MobileNetV2 alpha 0.35 (65 kernels), rounded up. The rewrite and the
# quantizer's pass take under 0.2 s, inside the 10% added to the conversion.
SECONDS_PER_CALIBRATION = 0.4
SECONDS_PER_CALIBRATION_LAYER_SAMPLE = 0.00025
# the quantizer's default is 16; its batch-1 ops on small tensors gain little from many
CALIBRATION_THREADS = min(os.cpu_count() or 1, 4)


class Technique(BaseOptimization):
    name = "ptq_int4"
    framework = "tensorflow"
    post_training = True

    def estimate_time(self, model_info: dict, config: TechniqueConfig) -> float:
        from optimization.backends.tensorflow import (
            DEFAULT_LAYERS, REPRESENTATIVE_SAMPLES, conversion_seconds)

        # the FP32 conversion, then the quantizer's pass over the file (and calibration)
        seconds = 1.1 * conversion_seconds(model_info)
        if self.options(config)["scheme"] == STATIC_SCHEME:
            layers = model_info.get("layers") or DEFAULT_LAYERS
            samples = min(model_info.get("calib_samples") or REPRESENTATIVE_SAMPLES,
                          REPRESENTATIVE_SAMPLES)
            seconds += (SECONDS_PER_CALIBRATION
                        + samples * layers * SECONDS_PER_CALIBRATION_LAYER_SAMPLE)
        return seconds

    def optimize(self, model, config, dataset, progress) -> OptimizedResult:
        from optimization.backends.tensorflow import (
            convert_to_tflite, pointwise_convs_as_fully_connected, technique_result,
            tflite_weights, write_bytes, xnnpack_partitions)

        options = self.options(config)
        scheme = options["scheme"]
        output_dir = Path(config.output_dir)
        progress(0.05, "exporting the FP32 .tflite to quantize", {})
        float_path = convert_to_tflite(model.module, output_dir / f"{self.name}_fp32_source.tflite")
        content = float_path.read_bytes()
        float_path.unlink()
        details = {"precision": "int4", "scheme": scheme}
        deploy = output_dir / f"{self.name}.tflite"
        if scheme == STATIC_SCHEME:
            content, rewritten = pointwise_convs_as_fully_connected(content)
            progress(0.3, f"calibrating int8 activations ({scheme})", {})
            granularity = options["weight_granularity"]
            files, samples = quantize_w4a8(
                content, dataset.x_calib, lambda: progress(0.8, f"quantizing ({scheme})", {}),
                ("per_channel", "per_tensor") if granularity == "auto" else (granularity,))
            details["convs_rewritten_as_fully_connected"] = rewritten
            details["activations"] = f"int8, calibrated on {samples} samples (static)"
            if granularity == "auto":
                progress(0.9, "comparing per-channel and per-tensor 8-bit weight scales", {})
                candidates = {scales: write_bytes(file, output_dir / f"{self.name}_{scales}.tflite")
                              for scales, file in files.items()}
                granularity, details["granularity_choice"] = smaller_unless_less_accurate(
                    candidates["per_channel"], candidates["per_tensor"], dataset,
                    float(options["auto_max_drop_pts"]))
                candidates[granularity].replace(deploy)
            else:
                write_bytes(files[granularity], deploy)
            details["eight_bit_weight_granularity"] = granularity
        else:
            progress(0.5, f"quantizing weights ({scheme})", {})
            write_bytes(quantize_weights_only(content, WEIGHT_ONLY_SCHEMES[scheme]), deploy)
            details["activations"] = ("float32, quantized on the fly by the integer kernels "
                                      "(dynamic range)")
        progress(0.95, "saving", {})
        layers = [{key: w[key] for key in ("op", "weight", "weight_bits")}
                  for w in tflite_weights(deploy)]
        details["layers"] = layers
        details["kept_wider"] = [{**layer, "why": why_wider(layer)}
                                 for layer in layers if layer["weight_bits"] > 4]
        # ops XNNPACK does not take run on LiteRT's slow built-in kernels: the reason a
        # 4-bit file can be slower than FP32
        details["xnnpack"] = diagnostic(xnnpack_partitions, deploy)
        details["native_note"] = ("the .keras file is the unchanged FP32 model; INT4 lives in "
                                  "the .tflite")
        return technique_result(self.name, config, model.module, deploy, details,
                                preparation=model.preparation).record(
            precision="int4").record_weight_bits()


def why_wider(layer: dict) -> str:
    if layer["weight_bits"] != 8:
        return NOT_QUANTIZED
    return WHY_WIDER.get(layer["op"], NOT_QUANTIZED)


def quantize_w4a8(content: bytes, calibration_x, before_quantizing=lambda: None,
                  eight_bit_scales=("per_tensor",)) -> tuple[dict[str, bytes], int]:
    """The static W4A8 file (see the module docstring) for each of `eight_bit_scales` (one scale
    per weight tensor or per output channel for the layers kept 8-bit; the 4-bit ones are per
    tensor), and the number of calibration samples. The activation ranges are calibrated once:
    they do not depend on how the weights are scaled."""
    from ai_edge_litert.interpreter import Interpreter

    from optimization.backends.tensorflow import representative_dataset

    engines = {scales: _w4a8_quantizer(content, scales) for scales in eight_bit_scales}
    signatures = Interpreter(model_content=content).get_signature_list()
    key = next(iter(signatures))
    input_name = signatures[key]["inputs"][0]
    samples = [{input_name: inputs[0]} for inputs in representative_dataset(calibration_x)()]
    with quiet_quantizer():
        calibration = _min_max_calibration(content, next(iter(engines.values())), {key: samples})
        before_quantizing()
        files = {scales: bytes(engine.quantize(calibration, enable_progress_bar=False,
                                               enable_progress_report=False).quantized_model)
                 for scales, engine in engines.items()}
    return files, len(samples)


def _min_max_calibration(content: bytes, engine, calibration_data: dict) -> dict:
    """Each activation's range: the lowest and highest value over all calibration samples, as
    the INT8 converter measures it. The quantizer's own `calibrate` keeps a moving average of
    each sample's range instead (weight 0.95 on the past), so fed one sample at a time its range
    is that of the last few dozen samples, and inputs beyond it clip: a small CNN lost 11-32 pt
    with it where the converter's INT8 lost 0-1."""
    from ai_edge_quantizer import calibrator, recipe_manager
    from ai_edge_quantizer.utils import qsv_utils

    recipe = recipe_manager.RecipeManager()
    recipe.load_quantization_recipe(engine.get_quantization_recipe())
    calibration = calibrator.Calibrator(content, num_threads=CALIBRATION_THREADS,
                                        qsv_update_func=qsv_utils.min_max_update)
    calibration.calibrate(calibration_data, recipe)
    return calibration.get_model_qsvs()


def _w4a8_quantizer(content: bytes, eight_bit_scales: str):
    from ai_edge_quantizer import algorithm_manager, qtyping, quantizer

    from optimization.backends.tensorflow import tflite_weights

    ops, granularity = qtyping.TFLOperationName, qtyping.QuantGranularity
    algorithm = algorithm_manager.AlgorithmName
    eight_bit = granularity.CHANNELWISE if eight_bit_scales == "per_channel" else granularity.TENSORWISE
    engine = quantizer.Quantizer(content)
    engine.add_static_config(".*", ops.ALL_SUPPORTED, 8, 8, eight_bit)
    engine.add_static_config(".*", ops.FULLY_CONNECTED, 8, 4, granularity.TENSORWISE,
                             algorithm.OCTAV)
    small = [re.escape(weight["output"]) for weight in tflite_weights(content)
             if weight["op"] == "FULLY_CONNECTED"
             and np.prod(weight["weight_shape"]) < SMALL_LAYER_WEIGHTS]
    if small:  # the quantizer matches an op by "<output tensor name>;"
        engine.add_static_config(f"^(?:{'|'.join(small)});", ops.FULLY_CONNECTED, 8, 8, eight_bit)
    # float32 input and output, like the converter's INT8 file
    engine.update_quantization_recipe(".*", ops.INPUT, algorithm_key=algorithm.NO_QUANTIZE)
    engine.update_quantization_recipe(".*", ops.OUTPUT, algorithm_key=algorithm.NO_QUANTIZE)
    return engine


def quantize_weights_only(content: bytes, bits_by_op: dict[str, int]) -> bytes:
    from ai_edge_quantizer import qtyping, quantizer

    engine = quantizer.Quantizer(content)
    for op_name, bits in bits_by_op.items():
        engine.add_dynamic_config(".*", qtyping.TFLOperationName[op_name], bits)
    return bytes(engine.quantize(enable_progress_bar=False,
                                 enable_progress_report=False).quantized_model)


@contextmanager
def quiet_quantizer():
    """Static quantization draws tqdm bars on stderr (calibration has no switch for it, and
    `enable_progress_bar=False` does not reach every one), and its interpreters warn that
    keeping every tensor is meant for debugging (it is how calibration works)."""
    from ai_edge_quantizer.utils import progress_utils

    bar = progress_utils.ProgressBar
    progress_utils.ProgressBar = lambda *args, **kwargs: bar(*args, **{**kwargs, "enable": False})
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*experimental_preserve_all_tensors")
            yield
    finally:
        progress_utils.ProgressBar = bar
