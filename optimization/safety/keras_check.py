"""Refuse Keras files that would run code when loaded, before any Keras loader sees them.

tf_keras ignores `safe_mode` for `.h5`, and a Lambda layer stores Python bytecode that the
loader executes. So we read the model's config ourselves (the `.keras` zip's `config.json`,
the `.h5` attribute `model_config`) and accept only known Keras classes from Keras modules.
Both schemas pass: tf_keras (Keras 2) and Keras 3 (`module` / `registered_name` on each
class, `batch_shape`, functional call arguments as `__keras_tensor__` specs, `keras.ops`
arithmetic nodes). A Keras 3 model must also be convertible to tf_keras, which every
TensorFlow technique runs on (`backends/keras3_convert.py`): its activations and ops must be
ones the converter knows (`KERAS3_ACTIVATIONS`, `KERAS3_OPS`), else it is refused here with
what to change.
Imports only the standard library and h5py: the web process calls this on upload.
"""
from __future__ import annotations

import json
import math
import zipfile
from pathlib import Path

from optimization.base import InvalidInputError, UnsafeModelError

# Layer, model and helper classes whose config is plain data (no code) in tf_keras / Keras.
ALLOWED_LAYERS = frozenset({
    # models
    "Functional", "Sequential", "Model",
    # core
    "InputLayer", "Dense", "Activation", "Dropout", "Flatten", "Reshape", "Permute",
    "RepeatVector", "Embedding", "Masking", "Identity",
    # convolution
    "Conv1D", "Conv2D", "Conv3D", "Conv1DTranspose", "Conv2DTranspose", "Conv3DTranspose",
    "DepthwiseConv1D", "DepthwiseConv2D", "SeparableConv1D", "SeparableConv2D",
    # pooling
    "MaxPooling1D", "MaxPooling2D", "MaxPooling3D", "AveragePooling1D", "AveragePooling2D",
    "AveragePooling3D", "GlobalAveragePooling1D", "GlobalAveragePooling2D",
    "GlobalAveragePooling3D", "GlobalMaxPooling1D", "GlobalMaxPooling2D", "GlobalMaxPooling3D",
    # normalization and regularization
    "BatchNormalization", "LayerNormalization", "GroupNormalization", "UnitNormalization",
    "SpatialDropout1D", "SpatialDropout2D", "SpatialDropout3D", "GaussianNoise",
    "GaussianDropout", "AlphaDropout", "ActivityRegularization",
    # activations
    "ReLU", "LeakyReLU", "PReLU", "ELU", "Softmax", "ThresholdedReLU",
    # reshaping
    "ZeroPadding1D", "ZeroPadding2D", "ZeroPadding3D", "Cropping1D", "Cropping2D",
    "Cropping3D", "UpSampling1D", "UpSampling2D", "UpSampling3D",
    # merging
    "Add", "Subtract", "Multiply", "Average", "Maximum", "Minimum", "Concatenate", "Dot",
    # preprocessing that is pure arithmetic
    "Rescaling", "Normalization", "Resizing", "CenterCrop",
    # attention and recurrent
    "Attention", "AdditiveAttention", "MultiHeadAttention", "LSTM", "GRU", "SimpleRNN",
    "LSTMCell", "GRUCell", "SimpleRNNCell", "Bidirectional", "TimeDistributed",
})
ALLOWED_HELPERS = frozenset({
    # initializers
    "Zeros", "Ones", "Constant", "RandomNormal", "RandomUniform", "TruncatedNormal",
    "GlorotUniform", "GlorotNormal", "HeUniform", "HeNormal", "LecunUniform", "LecunNormal",
    "Orthogonal", "Identity", "VarianceScaling",
    # regularizers and constraints
    "L1", "L2", "L1L2", "OrthogonalRegularizer", "MaxNorm", "MinMaxNorm", "NonNeg",
    "UnitNorm", "RadialConstraint",
    # dtype policies and containers for plain values (tensor specs in SavedModel metadata)
    "Policy", "DTypePolicy", "__tuple__", "TypeSpec", "TensorShape",
    "InputSpec",
    # Keras 3: mixed-precision policy, and a functional layer's input (a reference by name)
    "FloatDTypePolicy", "__keras_tensor__",
})
ALLOWED_MODULE_PREFIXES = ("keras", "tf_keras")
# Code-carrying layers, refused with a reason the user can act on.
CODE_LAYERS = {
    "Lambda": "a Lambda layer stores Python code that runs when the model loads",
    "TFOpLambda": "a TensorFlow-op layer can call any TensorFlow function, file operations included",
    "SlicingOpLambda": "a TensorFlow-op layer can call any TensorFlow function, file operations included",
}
# TFOpLambda wraps `x + y`-style arithmetic in functional tf_keras models; these symbol families
# compute on tensors only, so they stay allowed.
SAFE_TF_OP_PREFIXES = ("__operators__.", "math.", "nn.", "clip_by_value", "reshape",
                       "concat", "transpose", "compat.v1.transpose", "image.resize")
MAX_CONFIG_BYTES = 50 * 1024 * 1024
# Keras 3 activations the tf_keras conversion reproduces (same name in tf_keras, or Keras 3's
# definition re-implemented there)
KERAS3_ACTIVATIONS = frozenset({
    "linear", "relu", "relu6", "leaky_relu", "elu", "selu", "gelu", "sigmoid", "hard_sigmoid",
    "silu", "swish", "hard_silu", "hard_swish", "mish", "tanh", "softplus", "softsign",
    "exponential", "softmax", "log_softmax",
})
# keras.ops arithmetic recorded as graph nodes (module keras.src.ops.*) that the conversion
# turns into tf_keras layers (Rescaling for a constant operand, Add/Subtract/Multiply for two
# tensors)
KERAS3_OPS = frozenset({"Add", "Subtract", "Multiply", "Divide", "TrueDivide"})
H5_OPS_ADVICE = ("how Keras 3's .h5 format records keras.ops arithmetic such as `x + 3.0` or "
                 "`x / 255.0`; even Keras 3 cannot load that back. EdgeOpt rebuilds only a tensor "
                 "and a finite number combined by +, -, * or / (not a number divided by a tensor). "
                 "Save the model as .keras and upload that.")
# a model's training setup is not loaded (compile=False): its optimizer ("Custom>Adam" in a
# compiled tf_keras SavedModel), losses and metrics are not checked
TRAINING_KEYS = frozenset({"compile_config", "training_config"})


def check_keras_file(path: Path) -> dict:
    """Raise UnsafeModelError/InvalidInputError unless every class in the model's config is
    an allowlisted Keras class (and, for Keras 3, one the tf_keras conversion handles);
    return the parsed config."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".keras":
        config = _read_keras_zip_config(path)
    elif suffix == ".h5":
        config = _read_h5_config(path)
    else:
        raise InvalidInputError(f"{path.name}: expected a .keras or .h5 file")
    check_keras_config(config)
    if keras_major_version(path) >= 3:
        check_keras3_convertible(config, path.name)
    return config


def keras_major_version(path: Path) -> int:
    """The major version of the Keras that saved the file (2: tf_keras, 3: Keras 3), from the
    `.keras` zip's metadata.json or the `.h5` attribute keras_version; 2 when unrecorded."""
    path = Path(path)
    version = ""
    try:
        if path.suffix.lower() == ".keras":
            with zipfile.ZipFile(path) as archive:
                if "metadata.json" in archive.namelist():
                    info = archive.getinfo("metadata.json")
                    if info.file_size <= MAX_CONFIG_BYTES:
                        metadata = json.loads(archive.read(info))
                        version = str(metadata.get("keras_version", "") if isinstance(metadata, dict) else "")
        else:
            import h5py

            with h5py.File(path, "r") as h5:
                raw = h5.attrs.get("keras_version", b"")
                version = raw.decode() if isinstance(raw, bytes) else str(raw)
    except (OSError, zipfile.BadZipFile, ValueError, RecursionError, AttributeError):
        return 2  # unreadable metadata: decoding errors are ValueErrors; the config check decides
    major = version.split(".")[0]
    return int(major) if major.isdigit() and len(major) <= 3 else 2


def check_keras_config(config: dict) -> None:
    """Walk the whole config tree (nested models included) and check every class spec.
    The training setup (`TRAINING_KEYS`) is skipped: the engine loads with compile=False."""
    stack = [{key: value for key, value in config.items() if key not in TRAINING_KEYS}]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, dict):
            if "class_name" in node:
                _check_class_spec(node)
            stack.extend(value for key, value in node.items() if key not in TRAINING_KEYS)


def check_keras3_convertible(config: dict, filename: str) -> None:
    """Raise InvalidInputError for what the Keras 3 -> tf_keras conversion cannot rebuild:
    activations and `keras.ops` nodes it does not know, and constants passed positionally to
    a layer (how Keras 3's .h5 format records `x + 3.0`; Keras 3 itself cannot load that)
    unless it is arithmetic with a number that the loader rebuilds (`h5_constant_arithmetic`)."""
    advice = ("EdgeOpt runs TensorFlow techniques on tf_keras, so a Keras 3 model is converted "
              "layer by layer. Use built-in Keras layers and activations, or save the model with "
              "tf_keras, and upload it again.")
    stack = [config.get("config", config)]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
            continue
        if not isinstance(node, dict):
            continue
        name = node.get("class_name")
        is_op = str(node.get("module") or "").startswith("keras.src.ops")
        if is_op and name not in KERAS3_OPS:
            raise InvalidInputError(
                f"{filename}: the model applies keras.ops {name} ('{_layer_name(node)}') directly, "
                f"which has no tf_keras layer. {advice}")
        layer_config = node.get("config")
        if name and isinstance(layer_config, dict):
            activation = layer_config.get("activation")
            if isinstance(activation, str) and activation not in KERAS3_ACTIVATIONS:
                raise InvalidInputError(
                    f"{filename}: layer '{_layer_name(node)}' uses the activation {activation!r}, "
                    f"which tf_keras does not have. {advice}")
        inbound_nodes = [] if is_op or h5_constant_arithmetic(node) else node.get("inbound_nodes") or []
        for inbound in inbound_nodes:
            arguments = inbound.get("args", []) if isinstance(inbound, dict) else []
            if any(isinstance(value, (str, int, float)) for value in arguments):
                raise InvalidInputError(
                    f"{filename}: layer '{_layer_name(node)}' is called with a constant, "
                    f"{H5_OPS_ADVICE}")
        stack.extend(value for key, value in node.items() if key not in TRAINING_KEYS)


def constant_arithmetic(class_name: str, args: list) -> tuple[int, float, float] | None:
    """keras.ops `class_name` applied to one tensor and one number (`x + 3.0`, `2.0 - x`,
    `x * (1 / 6)`, `x / 255.0`) as (the tensor's position in `args`, scale, offset) with
    result = tensor * scale + offset; None for anything else (two tensors, a number divided
    by a tensor, a division by zero, a constant that is not a finite number)."""
    if class_name not in KERAS3_OPS or len(args) != 2:
        return None
    numbers = [_finite_number(arg) for arg in args]
    if numbers.count(True) != 1:
        return None
    tensor_index = numbers.index(False)
    if isinstance(args[tensor_index], (str, bytes, bool, int, float, type(None))):
        return None  # the other operand is no tensor either (NaN, a string)
    constant = float(args[1 - tensor_index])
    if class_name == "Add":
        return tensor_index, 1.0, constant
    if class_name == "Subtract":
        return (tensor_index, 1.0, -constant) if tensor_index == 0 else (tensor_index, -1.0, constant)
    if class_name == "Multiply":
        return tensor_index, constant, 0.0
    if tensor_index == 0 and _finite_number(1.0 / constant if constant else math.inf):
        return tensor_index, 1.0 / constant, 0.0  # Divide / TrueDivide by a constant
    return None


def _finite_number(value) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond float's range
        return False


def h5_constant_arithmetic(spec: dict) -> tuple[int, float, float] | None:
    """`constant_arithmetic` of a layer entry as Keras 3's .h5 writes a keras.ops node (a
    Keras layer's class name, no module, called once with a tensor and a number positionally);
    None for any other entry."""
    nodes = spec.get("inbound_nodes")
    if spec.get("module") is not None or not isinstance(nodes, list) or len(nodes) != 1:
        return None
    node = nodes[0]
    if not isinstance(node, dict) or node.get("kwargs") or not isinstance(node.get("args"), list):
        return None
    found = constant_arithmetic(spec.get("class_name"), node["args"])
    if found is None:
        return None
    tensor = node["args"][found[0]]
    is_tensor = isinstance(tensor, dict) and tensor.get("class_name") == "__keras_tensor__"
    return found if is_tensor else None


def _check_class_spec(spec: dict) -> None:
    name = spec.get("class_name")
    module = spec.get("module")
    if name in CODE_LAYERS and not _is_safe_tf_op(spec):
        raise UnsafeModelError(
            f"Refused: layer {_layer_name(spec)!r} is a {name}; {CODE_LAYERS[name]}. "
            "Rebuild the model without Lambda layers (use built-in Keras layers or a "
            "registered layer subclass re-created in code), save it again and upload that file."
        )
    if name in CODE_LAYERS:
        return
    keras3_op = (name in KERAS3_OPS and str(module or "").startswith("keras.src.ops")
                 or h5_constant_arithmetic(spec) is not None)  # the loader rebuilds it as Rescaling
    if name in KERAS3_OPS and module is None and name not in ALLOWED_LAYERS and not keras3_op:
        # no Keras layer by this name: a keras.ops node (`1.0 / x`) as Keras 3's .h5 writes it
        raise InvalidInputError(f"layer {_layer_name(spec)!r} is keras.ops {name}, {H5_OPS_ADVICE}")
    if name not in ALLOWED_LAYERS and name not in ALLOWED_HELPERS and not keras3_op:
        raise UnsafeModelError(
            f"Refused: class {name!r} (layer {_layer_name(spec)!r}) is not a built-in Keras "
            "class we can load without running its code. Custom layers, activations and "
            "functions are not accepted; rebuild the model from built-in Keras layers."
        )
    if module is not None and not str(module).startswith(ALLOWED_MODULE_PREFIXES):
        raise UnsafeModelError(
            f"Refused: class {name!r} comes from module {module!r}, not from Keras."
        )


def _is_safe_tf_op(spec: dict) -> bool:
    if spec.get("class_name") != "TFOpLambda":
        return False
    function = (spec.get("config") or {}).get("function", "")
    return isinstance(function, str) and function.startswith(SAFE_TF_OP_PREFIXES)


def _layer_name(spec: dict) -> str:
    config = spec.get("config")
    return (config.get("name") if isinstance(config, dict) else None) or spec.get("name") or "?"


def _read_keras_zip_config(path: Path) -> dict:
    try:
        with zipfile.ZipFile(path) as archive:
            info = archive.getinfo("config.json")
            if info.file_size > MAX_CONFIG_BYTES:
                raise InvalidInputError(f"{path.name}: config.json is implausibly large")
            return _model_config(json.loads(archive.read(info)), path.name)
    except (zipfile.BadZipFile, KeyError) as error:
        raise InvalidInputError(
            f"{path.name} is not a Keras v3 archive with a config.json ({error}); "
            "save the model with model.save('model.keras')."
        ) from error
    except ValueError as error:  # not JSON, not UTF-8, or a number int() refuses
        raise InvalidInputError(f"{path.name}: config.json is not valid JSON ({error})") from error
    except RecursionError:
        raise InvalidInputError(f"{path.name}: config.json is nested too deeply to be a Keras model") from None


def _model_config(config, name: str) -> dict:
    if not isinstance(config, dict):
        raise InvalidInputError(f"{name}: the model config is a JSON {type(config).__name__}, not the object "
                                "Keras writes; save the model with model.save")
    return config


def _read_h5_config(path: Path) -> dict:
    import h5py

    try:
        with h5py.File(path, "r") as h5:
            raw = h5.attrs.get("model_config")
    except OSError as error:
        raise InvalidInputError(f"{path.name} is not an HDF5 file ({error})") from error
    if raw is None:
        raise InvalidInputError(
            f"{path.name} holds no model_config (weights only?); save the whole model "
            "with model.save('model.h5') or, better, model.save('model.keras')."
        )
    try:
        return _model_config(json.loads(raw.decode("utf-8") if isinstance(raw, bytes) else raw), path.name)
    except ValueError as error:  # not JSON, not UTF-8, or a number int() refuses
        raise InvalidInputError(f"{path.name}: model_config is not valid JSON ({error})") from error
    except RecursionError:
        raise InvalidInputError(f"{path.name}: model_config is nested too deeply to be a Keras model") from None
