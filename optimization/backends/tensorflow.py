"""TensorFlow/Keras backend: safe loading, `.keras` / `.tflite` export, LiteRT measurement,
and the work every TensorFlow technique shares (fit with progress, conversion, counting).

tfmot needs the Keras 2 implementation (tf_keras): `prepare_worker_process()` sets
`TF_USE_LEGACY_KERAS` before TensorFlow is imported, so `keras` below is tf_keras everywhere in
the engine; importing this module without it is refused. A Keras 3 file (what TensorFlow
2.21's own tf.keras saves) is loaded by Keras 3 and converted to tf_keras
(`keras3_convert.py`); a SavedModel without Keras metadata is kept as its serving function
(`ServingFunction`), which only the post-training techniques use.
Deploy artifacts run in LiteRT (`ai_edge_litert`), one thread, so latencies compare.
"""
from __future__ import annotations

import os

if os.environ.get("TF_USE_LEGACY_KERAS") != "1":
    raise RuntimeError("the TensorFlow backend needs tf_keras: call optimization.worker.prepare_worker_process() "
                       "at the start of the process, before TensorFlow is imported")

import shutil
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import tensorflow as tf
import tf_keras as keras
from ai_edge_litert.interpreter import Interpreter

from optimization.base import (
    InvalidInputError,
    LoadedModel,
    OptimizedResult,
    ProgressFn,
    TechniqueConfig,
)
from optimization.atomic import atomic_output
from optimization.evaluator import steady_latency_ms
from optimization.safety.archives import safe_extract_zip
from optimization.safety.keras_check import check_keras_file, keras_major_version
from optimization.safety.savedmodel_check import NO_KERAS_METADATA, check_savedmodel_dir

# Latency is measured single-threaded: it is the most stable number on a shared host and the
# device estimator scales it to the target's thread count.
LITERT_THREADS = 1
REPRESENTATIVE_SAMPLES = 200
PREDICT_BATCH = 256
# Rough cost model for ETAs, timed on the 2-core host for the digits demo (8 kernels in its
# .tflite) and MobileNetV2 alpha 0.35 at 32x32 (65 kernels, fewer MACs), rounded up for a host
# shared with other jobs. At these sizes tracing, each training step and conversion cost per
# layer more than per MAC; model_info["layers"] counts the kernels of the FP32 deploy file.
DEFAULT_LAYERS = 8  # when model_info does not say: a small CNN like the demo
SECONDS_PER_FIT = 0.3  # building and tracing a new model's train step: fixed part...
SECONDS_PER_FIT_LAYER = 0.16  # ...and per layer
SECONDS_PER_LAYER_STEP = 0.0008  # one training step of batch 32, per layer...
SECONDS_PER_GIGAMAC_SAMPLE = 0.006  # ...plus its compute (forward and backward, 3x forward MACs)
SECONDS_PER_CONVERSION = 0.2  # .tflite conversion (with INT8 calibration alike): fixed part...
SECONDS_PER_CONVERSION_LAYER = 0.22  # ...and per layer
# keras.applications use BatchNorm momentum 0.999: after a few hundred steps from scratch the
# running statistics are still mostly their initial values and inference is near chance.
SHORT_TRAINING_BN_MOMENTUM = 0.9
# a Keras 3 model converted to tf_keras must give the same outputs to this bound, on up to
# CONVERSION_CHECK_SAMPLES calibration samples
CONVERSION_TOLERANCE = 1e-4
CONVERSION_CHECK_SAMPLES = 64


# ----------------------------------------------------------------------------- loading


class TensorFlowBackend:
    framework = "tensorflow"
    deploy_suffix = ".tflite"
    native_suffix = ".keras"

    def load(self, path: Path, input_shape: tuple | None = None,
             architecture: str | None = None, num_classes: int | None = None) -> LoadedModel:
        """Load `.keras`, `.h5` or a zipped SavedModel after the safety checks; the input
        shape comes from the model's Input (NHWC, without batch)."""
        path = Path(path)
        suffix = path.suffix.lower()
        source_module, preparation = None, {}
        if suffix in (".keras", ".h5"):
            check_keras_file(path)
            if keras_major_version(path) >= 3:
                source_module, module, preparation = _load_keras3(path)
            else:
                module = keras.models.load_model(path, compile=False, **(
                    {"safe_mode": True} if suffix == ".keras" else {}))
            source_format = suffix[1:]
        elif suffix == ".zip":
            module = _load_savedmodel_zip(path)
            source_format = "savedmodel"
        else:
            raise InvalidInputError(
                f"{path.name}: TensorFlow models are accepted as .keras, .h5 or a SavedModel .zip")
        trainable = not isinstance(module, ServingFunction)
        if trainable:
            reserve_layer_names(module)
        model_shape = tuple(int(d) for d in module.input_shape[1:] if d is not None)
        if len(model_shape) != len(module.input_shape) - 1:
            if input_shape is None:
                raise InvalidInputError(
                    f"{path.name} has an input with unknown dimensions {module.input_shape}; "
                    "give the input shape (NHWC, without batch) in the experiment's config")
            model_shape = tuple(input_shape)
        return LoadedModel(
            framework=self.framework,
            module=module,
            input_shape=model_shape,
            num_classes=num_classes or int(module.output_shape[-1]),
            source_path=path,
            source_format=source_format,
            architecture=architecture,
            trainable=trainable,
            not_trainable_reason="" if trainable else NO_KERAS_METADATA,
            preparation=preparation,
            source_module=source_module,
        )

    def verify_conversion(self, model: LoadedModel, calibration_x) -> None:
        """Compare the converted tf_keras model with the Keras 3 model it came from on the
        calibration samples; refuse the model when they differ by more than
        CONVERSION_TOLERANCE, else record the difference in `model.preparation`."""
        from optimization.backends.keras3_convert import max_output_difference

        samples = np.asarray(calibration_x, dtype=np.float32)[:CONVERSION_CHECK_SAMPLES]
        difference = max_output_difference(model.source_module, model.module, samples)
        if not difference <= CONVERSION_TOLERANCE:
            raise InvalidInputError(
                f"the Keras 3 model, converted to tf_keras for the TensorFlow techniques, gives "
                f"outputs up to {difference:.2g} away from the original on {len(samples)} "
                f"calibration samples (allowed: {CONVERSION_TOLERANCE:g}); save the model with "
                "tf_keras (TF_USE_LEGACY_KERAS=1) and upload that file")
        model.preparation["conversion"] = (
            f"converted from Keras 3 to tf_keras; max abs diff {difference:.1g} on "
            f"{len(samples)} calibration samples")
        model.preparation["max_abs_difference"] = difference
        model.source_module = None  # checked: the Keras 3 copy is not needed any more

    def export_deploy(self, model: LoadedModel, path: Path) -> Path:
        """FP32 `.tflite`, the baseline every technique is compared with."""
        return convert_to_tflite(model.module, path)

    def save_native(self, model: LoadedModel, path: Path) -> Path:
        return save_keras(model.module, path)

    def predict(self, deploy_path: Path, x) -> np.ndarray:
        """Logits (or the model's outputs) for a batch, run in LiteRT; int8 in/out tensors
        are quantized and dequantized with their scale and zero point."""
        x = np.asarray(x, dtype=np.float32)
        outputs = [_invoke(*_interpreter(deploy_path, x[start:start + PREDICT_BATCH]))
                   for start in range(0, len(x), PREDICT_BATCH)]
        return np.concatenate(outputs) if outputs else np.zeros((0,), np.float32)

    def latency_invoker(self, deploy_path: Path, sample):
        """One batch-1 inference in LiteRT with LITERT_THREADS thread, ready to be timed by the
        evaluator; `sample` is one sample, with or without its batch axis."""
        interpreter, batch = _interpreter(deploy_path, np.asarray(sample, dtype=np.float32))
        if len(batch) != 1:
            interpreter, batch = _interpreter(deploy_path, batch[:1])
        _set_input(interpreter, batch)
        return interpreter.invoke

    def latency_ms(self, deploy_path: Path, sample) -> float:
        return steady_latency_ms(self.latency_invoker(deploy_path, sample))

    def train_demo_model(self, dataset, path: Path) -> Path:
        """Train `digits_cnn` on the digits preset (NHWC) and save it as `.keras`."""
        from optimization.zoo.keras import digits_cnn

        keras.utils.set_random_seed(0)
        model = digits_cnn(dataset.input_shape, dataset.num_classes)
        fit(model, dataset.x_train, dataset.y_train, epochs=15, learning_rate=2e-3)
        accuracy = evaluate_accuracy(model, dataset.x_test, dataset.y_test)
        if accuracy < 0.95:
            raise RuntimeError(f"digits_cnn reached only {accuracy:.3f} test accuracy")
        return save_keras(model, path)


def _load_keras3(path: Path):
    """(the Keras 3 model, its tf_keras conversion, what the conversion did). Keras 3 is
    `import keras` even with TF_USE_LEGACY_KERAS set; safe_mode refuses code in `.keras`, and
    `check_keras_file` has refused it in both formats already. An `.h5` whose keras.ops
    arithmetic with a number Keras 3 cannot read back is loaded from a rebuilt copy."""
    import keras as keras3

    from optimization.backends.keras3_convert import h5_with_constant_arithmetic_rebuilt, to_tf_keras

    with tempfile.TemporaryDirectory() as folder:
        readable = h5_with_constant_arithmetic_rebuilt(path, folder) if path.suffix.lower() == ".h5" else path
        source = keras3.saving.load_model(readable, compile=False, safe_mode=True)
    converted, dropped = to_tf_keras(source)
    preparation = {"converted_from": f"Keras {keras3.__version__}"}
    if dropped:
        preparation["keras3_settings_without_tf_keras_equivalent"] = dropped
    return source, converted, preparation


def reserve_layer_names(model) -> None:
    """Move tf_keras's layer-name counters past every name in `model` (nested models too).

    A loaded or converted model keeps its saved names ("conv2d", "conv2d_1"), which tf_keras
    does not count; a layer created afterwards without a name gets the next counted one.
    tfmot's QAT transforms create such layers (SeparableConv2D -> DepthwiseConv2D + Conv2D):
    with a name already in the model, rebuilding it loops forever in tf_keras."""
    from tf_keras.src import backend as keras_backend

    counters = keras_backend.get_default_graph_uid_map()
    stack = [model]
    while stack:
        for layer in stack.pop().layers:
            if isinstance(layer, keras.Model):
                stack.append(layer)
            prefix, _, number = layer.name.rpartition("_")
            base, used = (prefix, int(number)) if prefix and number.isdigit() else (layer.name, 0)
            key = ("", base)  # tf_keras names layers in the blank namespace
            counters[key] = max(counters[key], used + 1)


class ServingFunction:
    """A SavedModel without Keras metadata (Keras 3 `model.export()`, `tf.saved_model.save`):
    its `serving_default` signature, with one input and one output. The converter reads it
    directly; nothing can train it."""

    def __init__(self, loaded):
        self.loaded = loaded
        if "serving_default" not in loaded.signatures:
            raise InvalidInputError("the SavedModel has no serving_default signature; export it "
                                    "with model.export('dir') or tf.saved_model.save(..., signatures=...)")
        self.function = loaded.signatures["serving_default"]
        inputs = self.function.structured_input_signature[1]
        outputs = self.function.structured_outputs
        if len(inputs) != 1 or len(outputs) != 1:
            raise InvalidInputError(
                f"the SavedModel's serving signature takes {len(inputs)} inputs and gives "
                f"{len(outputs)} outputs; EdgeOpt handles one of each")
        self.input_shape = tuple(next(iter(inputs.values())).shape)
        self.output_shape = tuple(next(iter(outputs.values())).shape)

    def save(self, path: Path) -> Path:
        """The SavedModel again, zipped (the native artifact of a post-training result)."""
        with tempfile.TemporaryDirectory() as directory:
            tf.saved_model.save(self.loaded, directory, signatures={"serving_default": self.function})
            archive = shutil.make_archive(str(Path(path).with_suffix("")), "zip", directory)
        return Path(archive)


def _load_savedmodel_zip(path: Path):
    extract_dir = Path(tempfile.mkdtemp(prefix="savedmodel_", dir=path.parent))
    try:
        safe_extract_zip(path, extract_dir)
        model_dir = _savedmodel_root(extract_dir)
        check_savedmodel_dir(model_dir)
        if not (model_dir / "keras_metadata.pb").is_file():
            return ServingFunction(tf.saved_model.load(str(model_dir)))
        return keras.models.load_model(model_dir, compile=False)
    finally:
        shutil.rmtree(extract_dir, ignore_errors=True)


def _savedmodel_root(extract_dir: Path) -> Path:
    """saved_model.pb at the top of the zip, or inside its single top folder."""
    if (extract_dir / "saved_model.pb").is_file():
        return extract_dir
    folders = [p for p in extract_dir.iterdir() if p.is_dir()]
    if len(folders) == 1 and (folders[0] / "saved_model.pb").is_file():
        return folders[0]
    raise InvalidInputError(
        "The zip holds no saved_model.pb at its top level or in one top folder; zip the "
        "folder written by model.save('dir').")


# ----------------------------------------------------------------------------- files


def save_keras(model, path: Path) -> Path:
    """`.keras`; a ServingFunction saves as a zipped SavedModel next to it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(model, ServingFunction):
        return model.save(path.with_suffix(".zip"))
    with atomic_output(path) as partial:
        model.save(partial)
    return path


def convert_to_tflite(model, path: Path, calibration_x: np.ndarray | None = None,
                      per_channel: bool = True) -> Path:
    """Write the Keras `model` as `.tflite`: FP32, or full-integer INT8 when calibration data
    is given, with per-channel weight scales (the converter's default) or, with
    `per_channel=False`, one scale per weight tensor. Tensor names are compacted (see
    `compact_tensor_names`).

    INT8 keeps float32 input and output: the file is a drop-in replacement for the FP32 one
    (same interface for the user and the evaluator) and the two boundary (de)quantize ops cost
    next to nothing. Every op inside runs in INT8 (TFLITE_BUILTINS_INT8), or conversion fails.
    """
    # From the traced inference function rather than from_keras_model, which first writes a
    # SavedModel: half the conversion time, same graph.
    def infer(*inputs):
        return model(inputs[0] if len(inputs) == 1 else list(inputs), training=False)

    if isinstance(model, ServingFunction):
        function, trackable = model.function, model.loaded
    else:
        signature = [tf.TensorSpec(tensor.shape, tensor.dtype) for tensor in model.inputs]
        function = tf.function(infer, autograph=False).get_concrete_function(*signature)
        trackable = model
    converter = tf.lite.TFLiteConverter.from_concrete_functions([function], trackable)
    if calibration_x is not None:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = representative_dataset(calibration_x)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        # the converter's only switch for this; per-tensor weights drop the per-channel
        # scale (float32) and zero point (int64) of every weight and bias channel
        converter._experimental_disable_per_channel = not per_channel
    return write_bytes(compact_tensor_names(converter.convert()), path)


def compact_tensor_names(content: bytes) -> bytes:
    """The `.tflite` with shorter tensor names, which are debug strings only.

    The converter names a tensor after every TF op fused into it ("m/b_relu/Relu6;m/b_BN/
    FusedBatchNormV3;m/b/Conv2D;..."), ~100 bytes a tensor. Each keeps the first of those
    names (the op that produced it), without the model's name scope (the leading "model/" most
    names share). Names stay unique, ops' outputs served first: the analyzer shows them as
    layer names; a constant whose name is taken gets "#" and its index. Signature defs, which
    runners look inputs and outputs up by, are kept.
    """
    from ai_edge_litert.tools import flatbuffer_utils

    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(content))
    for subgraph in model.subgraphs:
        names = [tensor.name.decode() if isinstance(tensor.name, bytes) else tensor.name or ""
                 for tensor in subgraph.tensors]
        scopes = Counter(name.split("/")[0] + "/" for name in names if "/" in name)
        scope = scopes.most_common(1)[0][0] if scopes else ""
        written = {index for op in subgraph.operators for index in op.outputs}
        taken = set()
        for index in sorted(range(len(names)), key=lambda i: i not in written):
            short = names[index].split(";")[0]
            if short.startswith(scope) and len(short) > len(scope):
                short = short[len(scope):]
            if short in taken:
                short = f"{short}#{index}"
            taken.add(short)
            subgraph.tensors[index].name = short.encode()
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def write_bytes(content: bytes, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as partial:
        partial.write_bytes(content)
    return path


def technique_result(name: str, config: TechniqueConfig, model, deploy_path: Path,
                     details: dict, counted_model=None, preparation: dict | None = None
                     ) -> OptimizedResult:
    """Save the native `.keras` next to the deploy file and count the optimized model
    (`counted_model`: the same network without tfmot's quantizer variables, when given).
    `preparation` (what loading did, e.g. the Keras 3 conversion) goes into the details."""
    if preparation:
        details.setdefault("model_preparation", preparation)
    native = save_keras(model, Path(config.output_dir) / f"{name}.keras")
    counted = counted_model if counted_model is not None else model
    # a serving function has no layers to count: the orchestrator counts the deploy file
    params, macs = (None, None) if isinstance(counted, ServingFunction) else count_params_macs(counted)
    return OptimizedResult(artifacts={"deploy": Path(deploy_path), "native": native},
                           details=details, model=model, params=params, macs=macs)


def representative_dataset(calibration_x: np.ndarray):
    samples = np.asarray(calibration_x, dtype=np.float32)[:REPRESENTATIVE_SAMPLES]

    def generate():
        for sample in samples:
            yield [sample[None]]

    return generate


# ----------------------------------------------------------------------------- LiteRT

# op -> index of its weight input; tflite tensor type -> bits
WEIGHTED_OPS = {"FULLY_CONNECTED": 1, "CONV_2D": 1, "DEPTHWISE_CONV_2D": 1, "TRANSPOSE_CONV": 1,
                "BATCH_MATMUL": 1, "EMBEDDING_LOOKUP": 1}
BITS_BY_TFLITE_TYPE = {0: 32, 1: 16, 9: 8, 17: 4}


def tflite_weights(tflite: Path | bytes) -> list[dict]:
    """Each op with a constant weight, in a `.tflite` file or its bytes: op type, its output
    tensor's name, the weight tensor's name, shape and storage bits, and its stored values
    (integers for quantized weights; packed bytes for 4-bit)."""
    from ai_edge_quantizer.utils import tfl_flatbuffer_utils as flatbuffer

    model = flatbuffer.read_model(tflite if isinstance(tflite, bytes) else Path(tflite).read_bytes())
    found = []
    for subgraph in model.subgraphs:
        for op in subgraph.operators:
            op_name = flatbuffer.TFL_OP_CODE_TO_NAME.get(
                model.operatorCodes[op.opcodeIndex].builtinCode)
            if op_name is None or op_name.name not in WEIGHTED_OPS:
                continue
            tensor = subgraph.tensors[op.inputs[WEIGHTED_OPS[op_name.name]]]
            data = model.buffers[tensor.buffer].data
            if data is None:  # not a constant (e.g. a computed matmul operand)
                continue
            found.append({"op": op_name.name,
                          "output": flatbuffer.get_tensor_name(subgraph.tensors[op.outputs[0]]),
                          "weight": flatbuffer.get_tensor_name(tensor),
                          "weight_shape": [int(d) for d in tensor.shape],
                          "weight_bits": BITS_BY_TFLITE_TYPE.get(tensor.type, 32),
                          "data": np.asarray(data)})
    return found


def tflite_int8_weight_sparsity(tflite_path: Path) -> float:
    """Share of zero values among INT8 weights (symmetric quantization keeps 0.0 at 0)."""
    weights = [w["data"] for w in tflite_weights(tflite_path) if w["weight_bits"] == 8]
    total = sum(w.size for w in weights)
    return float(sum(int((w == 0).sum()) for w in weights) / total) if total else 0.0


def _interpreter(deploy_path: Path, x: np.ndarray) -> tuple[Interpreter, np.ndarray]:
    """An interpreter sized for the batch `x` (a single sample without batch axis gets one)."""
    interpreter = Interpreter(model_path=str(deploy_path), num_threads=LITERT_THREADS)
    detail = interpreter.get_input_details()[0]
    if x.ndim == len(detail["shape"]) - 1:
        x = x[None]
    if tuple(detail["shape"]) != x.shape:
        interpreter.resize_tensor_input(detail["index"], list(x.shape))
    interpreter.allocate_tensors()
    return interpreter, x


def _set_input(interpreter: Interpreter, x: np.ndarray) -> None:
    detail = interpreter.get_input_details()[0]
    scale, zero_point = detail["quantization"]
    if detail["dtype"] in (np.int8, np.uint8) and scale:
        info = np.iinfo(detail["dtype"])
        x = np.clip(np.round(x / scale + zero_point), info.min, info.max)
    interpreter.set_tensor(detail["index"], x.astype(detail["dtype"]))


def _invoke(interpreter: Interpreter, x: np.ndarray) -> np.ndarray:
    _set_input(interpreter, x)
    interpreter.invoke()
    detail = interpreter.get_output_details()[0]
    output = interpreter.get_tensor(detail["index"])
    scale, zero_point = detail["quantization"]
    if detail["dtype"] in (np.int8, np.uint8) and scale:
        return (output.astype(np.float32) - zero_point) * scale
    return output.astype(np.float32)


def pointwise_convs_as_fully_connected(content: bytes) -> tuple[bytes, int]:
    """The float `.tflite` with every pointwise convolution (CONV_2D 1x1, stride 1, undilated,
    ungrouped, constant weight used by no other op) written as FULLY_CONNECTED with
    keep_num_dims, and how many were rewritten.

    On NHWC that is the same maths: each pixel's channel vector times the weight, whose
    [O, 1, 1, I] layout is FULLY_CONNECTED's [O, I] byte for byte; bias and fused activation
    carry over, padding does not matter at 1x1 (outputs match to float rounding). Why: LiteRT's
    XNNPACK delegate runs FULLY_CONNECTED with 4-bit weights and 8-bit activations but never
    takes a CONV_2D with 4-bit weights, which falls back to slow built-in kernels and splits the
    graph, so 4-bit pointwise layers (most of a MobileNet's weights) need this form.
    """
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils

    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(content))
    codes = [code.builtinCode for code in model.operatorCodes]
    fc_code = None
    rewritten = 0
    for subgraph in model.subgraphs:
        uses = Counter(index for op in subgraph.operators for index in op.inputs)
        for op in subgraph.operators:
            if codes[op.opcodeIndex] != schema.BuiltinOperator.CONV_2D:
                continue
            options, weight = op.builtinOptions, subgraph.tensors[op.inputs[1]]
            out_channels, height, width, in_channels = (int(d) for d in weight.shape)
            if ((height, width) != (1, 1) or (options.strideH, options.strideW) != (1, 1)
                    or (options.dilationHFactor, options.dilationWFactor) != (1, 1)
                    or int(subgraph.tensors[op.inputs[0]].shape[-1]) != in_channels  # grouped
                    or uses[op.inputs[1]] != 1
                    or model.buffers[weight.buffer].data is None):  # weight computed at runtime
                continue
            if fc_code is None:
                if schema.BuiltinOperator.FULLY_CONNECTED not in codes:
                    code = schema.OperatorCodeT()
                    code.builtinCode = code.deprecatedBuiltinCode = (
                        schema.BuiltinOperator.FULLY_CONNECTED)
                    code.version = 1
                    model.operatorCodes.append(code)
                    codes.append(code.builtinCode)
                fc_code = codes.index(schema.BuiltinOperator.FULLY_CONNECTED)
            fully_connected = schema.FullyConnectedOptionsT()
            fully_connected.fusedActivationFunction = options.fusedActivationFunction
            fully_connected.keepNumDims = True
            op.opcodeIndex = fc_code
            op.builtinOptionsType = schema.BuiltinOptions.FullyConnectedOptions
            op.builtinOptions = fully_connected
            weight.shape = np.array([out_channels, in_channels], dtype=np.int32)
            if weight.shapeSignature is not None and len(weight.shapeSignature):
                weight.shapeSignature = np.array([out_channels, in_channels], dtype=np.int32)
            rewritten += 1
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model)), rewritten


def xnnpack_partitions(deploy_path: Path) -> dict:
    """{"partitions": how many subgraphs LiteRT's default XNNPACK delegate takes in the file
    (1: the whole graph, when nothing is left out), "ops_left_to_builtin_kernels": the ops it
    leaves to the built-in kernels, by type}. Reads the interpreter's private op list: a
    diagnostic, run through `_common.diagnostic` so it cannot fail a technique."""
    interpreter = Interpreter(model_path=str(deploy_path), num_threads=LITERT_THREADS)
    interpreter.allocate_tensors()
    ops = interpreter._get_ops_details()
    delegates = [op for op in ops if op["op_name"] == "DELEGATE"]
    producer = {int(t): op["index"] for op in ops if op["op_name"] != "DELEGATE"
                for t in op["outputs"]}
    covered = set()
    for delegate in delegates:  # walk back from each partition's outputs to its inputs
        stop = {int(t) for t in delegate["inputs"]}
        frontier = [int(t) for t in delegate["outputs"]]
        while frontier:
            tensor = frontier.pop()
            if tensor in stop or tensor not in producer or producer[tensor] in covered:
                continue
            covered.add(producer[tensor])
            frontier += [int(t) for t in ops[producer[tensor]]["inputs"] if t >= 0]
    left = Counter(op["op_name"] for op in ops
                   if op["op_name"] != "DELEGATE" and op["index"] not in covered)
    return {"partitions": len(delegates), "ops_left_to_builtin_kernels": dict(left)}


# ----------------------------------------------------------------------------- training


class ProgressCallback(keras.callbacks.Callback):
    """Reports every batch as a fraction of this technique (between `start` and `end`);
    ExperimentStopped raised by `progress` propagates out of `fit`."""

    def __init__(self, progress: ProgressFn, epochs: int, steps_per_epoch: int,
                 start: float, end: float, message: str):
        super().__init__()
        self.progress, self.epochs, self.steps = progress, epochs, steps_per_epoch
        self.start, self.end, self.message = start, end, message
        self.epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        done = (self.epoch * self.steps + batch + 1) / (self.epochs * self.steps)
        metrics = {key: round(float(value), 4) for key, value in (logs or {}).items()}
        self.progress(self.start + (self.end - self.start) * done,
                      f"{self.message} epoch {self.epoch + 1}/{self.epochs}", metrics)


def outputs_probabilities(model) -> bool:
    """True when the model ends in a softmax (so its outputs are not logits)."""
    last = unwrap(model.layers[-1])
    if isinstance(last, keras.Model):
        return outputs_probabilities(last)
    activation = getattr(last, "activation", None)
    activation = getattr(activation, "activation", activation)  # tfmot's QuantizeAwareActivation
    return isinstance(last, keras.layers.Softmax) or activation is keras.activations.softmax


def classification_loss(model):
    return keras.losses.SparseCategoricalCrossentropy(from_logits=not outputs_probabilities(model))


def adam(learning_rate: float, decay_steps: int = 0):
    """Adam; with `decay_steps`, its rate follows a cosine down to zero over that many steps,
    so a short fine-tune ends with small steps that settle the weights instead of stopping
    mid-stride."""
    if decay_steps:
        learning_rate = keras.optimizers.schedules.CosineDecay(learning_rate, decay_steps)
    return keras.optimizers.Adam(learning_rate)


def training_steps(samples: int, epochs: int, batch_size: int) -> int:
    return epochs * int(np.ceil(samples / batch_size))


def fit(model, x, y, epochs: int, progress: ProgressFn | None = None, *, learning_rate=1e-3,
        batch_size=32, span=(0.0, 1.0), message="fine-tuning", callbacks=(), compile_model=True,
        cosine: bool = False, seed: int = 0):
    """Train with Adam on sparse labels (its rate cosine-decayed over the run when `cosine`),
    reporting each batch to `progress`. With compile_model=False the model brings its own
    optimizer and loss (a distiller). A budget of 0 epochs trains nothing."""
    if epochs <= 0:
        return None
    if compile_model:
        decay = training_steps(len(x), epochs, batch_size) if cosine else 0
        model.compile(optimizer=adam(learning_rate, decay),
                      loss=classification_loss(model), metrics=["accuracy"])
    steps = training_steps(len(x), 1, batch_size)
    all_callbacks = list(callbacks)
    if progress is not None:
        all_callbacks.append(ProgressCallback(progress, epochs, steps, *span, message))
    keras.utils.set_random_seed(seed)
    return model.fit(x, y, epochs=epochs, batch_size=batch_size, shuffle=True,
                     callbacks=all_callbacks, verbose=0)


def follow_batchnorm_faster(model, momentum: float = SHORT_TRAINING_BN_MOMENTUM):
    """Let BatchNorm running statistics catch up within a short from-scratch training."""
    for layer in leaf_layers(model):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = momentum
    return model


def evaluate_accuracy(model, x, y, batch_size: int = 256) -> float:
    """Test-split accuracy of an in-memory Keras model (argmax of its outputs)."""
    predictions = model.predict(x, batch_size=batch_size, verbose=0)
    return float((predictions.argmax(axis=1) == np.asarray(y)).mean())


def training_seconds(model_info: dict, epochs: float, batch_size: int = 32, *,
                     setup: float = 1.0, step: float = 1.0) -> float:
    """ETA for `epochs` of fine-tuning the model of `model_info`: building the train step
    (`setup` times a plain model's: tfmot's wrappers and fake-quant take longer to build), then
    each step (`step` times a plain step of the model: a narrowed student costs less, a
    teacher's forward pass adds)."""
    samples = model_info.get("train_samples") or 1000
    macs = model_info.get("macs") or 1e6
    layers = model_info.get("layers") or DEFAULT_LAYERS
    steps = epochs * np.ceil(samples / batch_size)
    per_step = layers * SECONDS_PER_LAYER_STEP + batch_size * 3 * macs / 1e9 * SECONDS_PER_GIGAMAC_SAMPLE
    return float(setup * (SECONDS_PER_FIT + layers * SECONDS_PER_FIT_LAYER) + steps * step * per_step)


def conversion_seconds(model_info: dict) -> float:
    """ETA for one `.tflite` conversion (FP32, or INT8 with its calibration) and saving."""
    layers = model_info.get("layers") or DEFAULT_LAYERS
    return SECONDS_PER_CONVERSION + layers * SECONDS_PER_CONVERSION_LAYER


# ----------------------------------------------------------------------------- counting


def unwrap(layer):
    """The layer inside tfmot's pruning / quantization wrappers."""
    while hasattr(layer, "layer") and isinstance(layer.layer, keras.layers.Layer):
        layer = layer.layer
    return layer


def finalize_preprocessing_state(model):
    """Refresh what tf_keras preprocessing layers compute from their weights. An adapted
    Normalization divides by tensors that `finalize_state()` derives from its mean and variance
    weights; a clone given its weights by `set_weights` (clone_model, from_config, tfmot's
    wrappers) keeps those of its construction (mean 0, variance 1) and passes its input through
    unchanged until this is called. Returns the model."""
    for layer in leaf_layers(model):
        layer = unwrap(layer)
        if hasattr(layer, "finalize_state") and layer.built:
            layer.finalize_state()
    return model


def count_params_macs(model) -> tuple[int, int]:
    """Parameters as deployed and multiply-accumulates of one forward pass of a batch-1 sample.

    The converter folds BatchNorm into the layer before it, leaving one bias per channel, so a
    BatchNorm counts its channels (exact after bias-free convolutions, as in the zoo models):
    the counts match what the analyzer reads from the `.tflite`."""
    layers = [unwrap(layer) for layer in leaf_layers(model)]
    params = sum(int(layer.moving_mean.shape[-1]) if isinstance(layer, keras.layers.BatchNormalization)
                 else layer.count_params() for layer in layers)
    return int(params), int(sum(_layer_macs(layer) for layer in leaf_layers(model)))


def leaf_layers(model):
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from leaf_layers(layer)
        else:
            yield layer


def _layer_macs(wrapped) -> int:
    layer = unwrap(wrapped)
    try:
        out_shape, in_shape = wrapped.output_shape, wrapped.input_shape
    except (AttributeError, RuntimeError):
        return 0
    if isinstance(out_shape, list) or isinstance(in_shape, list):
        return 0
    spatial_out = int(np.prod([d for d in out_shape[1:-1] if d])) if len(out_shape) > 2 else 1
    if isinstance(layer, keras.layers.DepthwiseConv2D):
        return spatial_out * int(np.prod(layer.kernel_size)) * int(out_shape[-1])
    if isinstance(layer, keras.layers.SeparableConv2D):
        depthwise_channels = int(in_shape[-1]) * layer.depth_multiplier
        return spatial_out * (int(np.prod(layer.kernel_size)) * depthwise_channels
                              + depthwise_channels * int(out_shape[-1]))
    if isinstance(layer, keras.layers.Conv2DTranspose):
        spatial_in = int(np.prod([d for d in in_shape[1:-1] if d]))
        return spatial_in * int(np.prod(layer.kernel_size)) * int(in_shape[-1]) * int(out_shape[-1])
    if isinstance(layer, (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D)):
        in_per_group = int(in_shape[-1]) // max(1, getattr(layer, "groups", 1))
        return spatial_out * int(np.prod(layer.kernel_size)) * in_per_group * int(out_shape[-1])
    if isinstance(layer, keras.layers.Dense):
        return spatial_out * int(in_shape[-1]) * int(out_shape[-1])
    return 0


def nonzero_fraction(model) -> float:
    """Share of non-zero weights among kernels (what pruning zeroes)."""
    kernels = [w.numpy() for layer in leaf_layers(model) for w in unwrap(layer).weights
               if "kernel" in w.name]
    total = sum(k.size for k in kernels)
    return float(sum(np.count_nonzero(k) for k in kernels) / total) if total else 1.0


BACKEND = TensorFlowBackend()
