"""Keras 3 models rebuilt as equivalent tf_keras models, for tfmot and the rest of the engine.

TensorFlow 2.21's own `tf.keras` is Keras 3, so that is what users save; tfmot (pruning,
QAT) and every TensorFlow technique here need tf_keras (Keras 2). A Keras 3 model is loaded by
Keras 3 itself (`safe_mode=True`, after the static allowlist of `safety/keras_check.py`),
then rebuilt layer by layer from its config translated to tf_keras, with the same layer
names, and its weights copied over. The backend then compares both models' outputs on the
calibration samples (`max_output_difference`) before anything runs on the copy.

What the translation changes (everything else passes through unchanged):
- serialized Keras 3 objects (dtype policies, initializers, regularizers, constraints) become
  their plain tf_keras form; settings a tf_keras class does not take are dropped and listed
  (a dropped setting that mattered shows up in the output check);
- `InputLayer.batch_shape` becomes `batch_input_shape`;
- activations Keras 3 names or defines differently (`silu`, `hard_sigmoid`, `hard_silu`,
  `relu6`, ...) get tf_keras functions with Keras 3's definition (`KERAS3_ACTIVATIONS`);
- `keras.ops` arithmetic recorded in a functional graph (`x + 3.0`, `x * y`, as in
  MobileNetV3's squeeze-excite) becomes `Rescaling` or the merge layer it equals.
"""
from __future__ import annotations

import inspect
import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import tensorflow as tf
import tf_keras

from optimization.base import InvalidInputError
from optimization.safety.keras_check import (
    KERAS3_ACTIVATIONS, KERAS3_OPS, constant_arithmetic, h5_constant_arithmetic)

# keyword arguments tf_keras's base Layer takes besides a class's own
BASE_LAYER_KWARGS = frozenset({"name", "dtype", "trainable", "dynamic", "input_dim", "input_shape",
                               "batch_input_shape", "batch_size", "weights",
                               "activity_regularizer", "autocast"})
MODEL_CLASSES = ("Functional", "Sequential", "Model")


# Keras 3's definitions of the activations tf_keras lacks or defines otherwise (tf_keras's
# hard_sigmoid is 0.2x + 0.5; Keras 3's is relu6(x + 3) / 6). Registered, so a converted model
# saves and loads as .keras wherever this module is imported.
@tf_keras.saving.register_keras_serializable(package="edgeopt_keras3")
def hard_sigmoid(x):
    return tf.nn.relu6(x + 3.0) * (1.0 / 6.0)


@tf_keras.saving.register_keras_serializable(package="edgeopt_keras3")
def hard_silu(x):
    return x * hard_sigmoid(x)


@tf_keras.saving.register_keras_serializable(package="edgeopt_keras3")
def relu6(x):
    return tf.nn.relu6(x)


@tf_keras.saving.register_keras_serializable(package="edgeopt_keras3")
def leaky_relu(x):
    return tf.nn.leaky_relu(x, alpha=0.2)


@tf_keras.saving.register_keras_serializable(package="edgeopt_keras3")
def log_softmax(x):
    return tf.nn.log_softmax(x)


OWN_ACTIVATIONS = {"hard_sigmoid": hard_sigmoid, "hard_silu": hard_silu, "hard_swish": hard_silu,
                   "relu6": relu6, "leaky_relu": leaky_relu, "log_softmax": log_softmax,
                   "silu": "swish"}


@tf_keras.saving.register_keras_serializable(package="edgeopt_keras3")
class Keras3Activation(tf_keras.layers.Layer):
    """An Activation layer whose function is one of OWN_ACTIVATIONS (Keras 3's definition).
    Not a tf_keras Activation on purpose: tfmot's 8-bit scheme (and its conv-BN-activation
    fusion patterns) raise on an Activation with a function it does not know, while a layer of
    its own is left in float by QAT, calibrated by the INT8 conversion, and skipped by pruning
    (no prunable weights). Channel surgery passes through it: it is elementwise."""

    def __init__(self, function_name: str, **kwargs):
        super().__init__(**kwargs)
        self.function_name = function_name
        self.function = OWN_ACTIVATIONS[function_name]

    def call(self, inputs):
        return self.function(inputs)

    def get_config(self):
        return {**super().get_config(), "function_name": self.function_name}

    def get_prunable_weights(self):  # tfmot: nothing to prune, not an unknown layer
        return []


def to_tf_keras(model) -> tuple[tf_keras.Model, dict]:
    """A tf_keras functional model equal to the Keras 3 `model`, weights copied, and what the
    translation dropped ({class: [settings]})."""
    dropped: dict[str, set] = {}
    converted = _rebuild(model, dropped)
    _copy_weights(model, converted)
    return converted, {name: sorted(keys) for name, keys in dropped.items()}


def max_output_difference(source, converted, x, batch_size: int = 64) -> float:
    """Largest absolute difference between the two models' outputs on `x` (inference mode)."""
    worst = 0.0
    x = np.asarray(x, dtype=np.float32)
    for start in range(0, len(x), batch_size):
        batch = x[start:start + batch_size]
        expected = np.asarray(source(batch, training=False))
        got = np.asarray(converted(batch, training=False))
        worst = max(worst, float(np.max(np.abs(expected - got))) if expected.size else 0.0)
    return worst


def h5_with_constant_arithmetic_rebuilt(path: Path, folder: Path) -> Path:
    """Keras 3's .h5 writes keras.ops arithmetic with a number (`x + 3.0`, `x * (1 / 6)` in
    MobileNetV3's hard_sigmoid) as a layer entry that even Keras 3 cannot load back. Return a
    copy of `path` in `folder` whose such entries (`h5_constant_arithmetic`) are Rescaling
    layers computing the same, or `path` itself when it has none. Those entries own no
    weights and every name stays, so the file's weights load into the copy as saved."""
    with h5py.File(path, "r") as h5:
        raw = h5.attrs["model_config"]
    config = json.loads(raw.decode("utf-8") if isinstance(raw, bytes) else raw)
    if not _rescaling_for_constant_arithmetic(config):
        return path
    rebuilt = Path(folder) / Path(path).name
    shutil.copyfile(path, rebuilt)
    with h5py.File(rebuilt, "r+") as h5:
        h5.attrs["model_config"] = json.dumps(config).encode("utf-8")
    return rebuilt


def _rescaling_for_constant_arithmetic(node) -> int:
    """Replace, in place, every `h5_constant_arithmetic` entry of the config tree `node` by
    the Rescaling layer it equals; the number replaced."""
    if isinstance(node, list):
        return sum(_rescaling_for_constant_arithmetic(item) for item in node)
    if not isinstance(node, dict):
        return 0
    found = h5_constant_arithmetic(node)
    if found is None:
        return sum(_rescaling_for_constant_arithmetic(value) for value in node.values())
    tensor_index, scale, offset = found
    tensor = node["inbound_nodes"][0]["args"][tensor_index]
    name = node.get("name") or node["config"]["name"]
    node.clear()
    node.update({"class_name": "Rescaling", "name": name,
                 "config": {"name": name, "scale": scale, "offset": offset},
                 "inbound_nodes": [{"args": [tensor], "kwargs": {}}]})
    return 1


# ----------------------------------------------------------------------------- graph


def _rebuild(model, dropped) -> tf_keras.Model:
    config = model.get_config()
    if type(model).__name__ == "Sequential":
        return _rebuild_sequential(model, config, dropped)
    if "layers" not in config or "output_layers" not in config:
        raise InvalidInputError(
            f"{type(model).__name__} is a subclassed Keras 3 model: only Sequential and functional "
            "models can be converted to tf_keras; rebuild it with keras.Model(inputs, outputs)")
    tensors: dict[tuple[str, int], list] = {}
    inputs = []
    for entry in config["layers"]:
        name, class_name = entry["name"], entry["class_name"]
        if class_name == "InputLayer":
            tensors[(name, 0)] = [_input(entry["config"])]
            continue
        for node_index, node in enumerate(entry.get("inbound_nodes") or []):
            args = _resolve(node.get("args", []), tensors)
            kwargs = {key: value for key, value in _resolve(node.get("kwargs", {}), tensors).items()
                      if value is not None}
            if entry.get("module", "").startswith("keras.src.ops"):
                output = _op(class_name, entry["config"], args, name, node_index)
            else:
                layer = _layer(model.get_layer(name), entry, dropped) if node_index == 0 else layer
                output = layer(*args, **kwargs)
            tensors[(name, node_index)] = list(tf.nest.flatten(output))
    for spec in _tensor_refs(config["input_layers"]):
        inputs.append(tensors[(spec[0], spec[1])][spec[2]])
    outputs = [tensors[(spec[0], spec[1])][spec[2]] for spec in _tensor_refs(config["output_layers"])]
    return tf_keras.Model(inputs[0] if len(inputs) == 1 else inputs,
                          outputs[0] if len(outputs) == 1 else outputs, name=config.get("name"))


def _rebuild_sequential(model, config, dropped) -> tf_keras.Model:
    first = config["layers"][0] if config["layers"] else {}
    if first.get("class_name") != "InputLayer":
        raise InvalidInputError("the Keras 3 Sequential model has no Input; build it with "
                                "keras.Input(shape) first and save it again")
    x = inputs = _input(first["config"])
    for layer in model.layers:
        x = _layer(layer, {"class_name": type(layer).__name__,
                           "config": layer.get_config()}, dropped)(x)
    return tf_keras.Model(inputs, x, name=config.get("name"))


def _tensor_refs(refs) -> list:
    """[name, node, index] or a list of them -> a list of them."""
    return [refs] if refs and isinstance(refs[0], str) else list(refs)


def _resolve(value, tensors):
    """Keras 3 call arguments with each `__keras_tensor__` replaced by the tf_keras tensor."""
    if isinstance(value, dict):
        if value.get("class_name") == "__keras_tensor__":
            name, node_index, index = value["config"]["keras_history"]
            return tensors[(name, node_index)][index]
        return {key: _resolve(item, tensors) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_resolve(item, tensors) for item in value]
    return value


def _input(config: dict):
    shape = config.get("batch_shape") or config.get("batch_input_shape")
    return tf_keras.Input(batch_shape=tuple(shape), dtype=_plain(config.get("dtype")) or "float32",
                          name=config.get("name"))


def _op(class_name: str, config: dict, args: list, name: str, node_index: int):
    """A `keras.ops` arithmetic node as the tf_keras layer that computes the same."""
    if class_name not in KERAS3_OPS or len(args) != 2:
        raise InvalidInputError(f"keras.ops.{class_name} in the graph has no tf_keras equivalent")
    suffix = f"_{node_index}" if node_index else ""
    tensors = [arg for arg in args if not isinstance(arg, (int, float))]
    if len(tensors) == 2:
        merge = {"Add": tf_keras.layers.Add, "Subtract": tf_keras.layers.Subtract,
                 "Multiply": tf_keras.layers.Multiply}.get(class_name)
        if merge is None:
            raise InvalidInputError(f"keras.ops.{class_name} of two tensors has no tf_keras layer")
        return merge(name=name + suffix)(args)
    found = constant_arithmetic(class_name, args)
    if found is None:
        raise InvalidInputError(f"keras.ops.{class_name} with these arguments is not supported")
    tensor_index, scale, offset = found
    return tf_keras.layers.Rescaling(scale, offset, name=name + suffix)(args[tensor_index])


# ----------------------------------------------------------------------------- layers


def _layer(source_layer, entry: dict, dropped):
    class_name = entry["class_name"]
    if class_name in MODEL_CLASSES:
        return _rebuild(source_layer, dropped)
    activation = entry["config"].get("activation")
    if class_name == "Activation" and callable(OWN_ACTIVATIONS.get(activation)):
        return Keras3Activation(activation, name=entry["config"].get("name"))
    cls = getattr(tf_keras.layers, class_name, None)
    if cls is None:
        raise InvalidInputError(
            f"the Keras 3 layer {class_name} ('{entry['config'].get('name')}') has no tf_keras "
            "equivalent; rebuild the model from layers both Keras versions share")
    config = {key: _translate(key, value) for key, value in entry["config"].items()}
    return cls(**_accepted(cls, config, dropped))


def _accepted(cls, config: dict, dropped) -> dict:
    """`config` without the settings `cls` does not take (recorded in `dropped`)."""
    allowed = set(BASE_LAYER_KWARGS)
    for base in cls.__mro__:  # settings a subclass passes on through **kwargs
        parameters = inspect.signature(base.__init__).parameters
        allowed |= set(parameters)
        if not any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
            break
    extra = {key for key in config if key not in allowed}
    if extra:
        dropped.setdefault(cls.__name__, set()).update(extra)
    return {key: value for key, value in config.items() if key in allowed}


def _translate(key: str, value):
    if key == "activation" and isinstance(value, str):
        return OWN_ACTIVATIONS.get(value, value) if value in KERAS3_ACTIVATIONS else value
    if key == "dtype":
        return _plain(value)
    if isinstance(value, dict) and "class_name" in value:
        return _helper(value)
    return value


def _plain(dtype):
    """A Keras 3 DTypePolicy spec -> its policy name."""
    if isinstance(dtype, dict):
        return (dtype.get("config") or {}).get("name")
    return dtype


def _helper(spec: dict) -> dict:
    """A serialized Keras 3 initializer / regularizer / constraint as tf_keras's plain
    {class_name, config}, keeping the settings its tf_keras class takes."""
    class_name, config = spec["class_name"], dict(spec.get("config") or {})
    for module in (tf_keras.initializers, tf_keras.regularizers, tf_keras.constraints):
        cls = getattr(module, class_name, None)
        if inspect.isclass(cls):
            parameters = inspect.signature(cls.__init__).parameters
            config = {key: value for key, value in config.items() if key in parameters}
            break
    return {"class_name": class_name, "config": config}


def _copy_weights(source, converted) -> None:
    """Each converted layer gets the weights of the Keras 3 layer of the same name."""
    for layer in converted.layers:
        if not layer.weights:
            continue
        source_layer = source.get_layer(layer.name)
        if isinstance(layer, tf_keras.Model):
            _copy_weights(source_layer, layer)
            continue
        weights = source_layer.get_weights()
        expected = [tuple(w.shape) for w in layer.get_weights()]
        if [tuple(w.shape) for w in weights] != expected:
            raise InvalidInputError(
                f"layer '{layer.name}' holds weights shaped {[tuple(w.shape) for w in weights]} in "
                f"Keras 3 but {expected} in tf_keras; this model cannot be converted")
        layer.set_weights(weights)
