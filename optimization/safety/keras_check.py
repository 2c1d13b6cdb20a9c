"""Refuse Keras files that would run code when loaded, before any Keras loader sees them.

tf_keras ignores `safe_mode` for `.h5`, and a Lambda layer stores Python bytecode that the
loader executes. So we read the model's config ourselves (the `.keras` zip's `config.json`,
the `.h5` attribute `model_config`) and accept only known Keras classes from Keras modules.
Imports only the standard library and h5py: the web process calls this on upload.
"""
from __future__ import annotations

import json
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


def check_keras_file(path: Path) -> dict:
    """Raise UnsafeModelError/InvalidInputError unless every class in the model's config is
    an allowlisted Keras class; return the parsed config."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".keras":
        config = _read_keras_zip_config(path)
    elif suffix == ".h5":
        config = _read_h5_config(path)
    else:
        raise InvalidInputError(f"{path.name}: expected a .keras or .h5 file")
    check_keras_config(config)
    return config


def check_keras_config(config: dict) -> None:
    """Walk the whole config tree (nested models included) and check every class spec.
    The training setup (`compile_config`) is skipped: the engine loads with compile=False."""
    stack = [{key: value for key, value in config.items() if key != "compile_config"}]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, dict):
            if "class_name" in node:
                _check_class_spec(node)
            stack.extend(node.values())


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
    if name not in ALLOWED_LAYERS and name not in ALLOWED_HELPERS:
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
