"""Work the TensorFlow techniques share, so that no technique imports another: channel
surgery and its fine-tuning (prune_structured, distillation's student, hybrid), the distiller,
magnitude pruning (prune_unstructured, hybrid), quantization-aware training from calibrated
ranges (qat, hybrid), a Normalization head rewritten as one affine op before INT8 conversion
(ptq_int8, qat, hybrid), and `diagnostic`, which keeps an optional measurement from failing a run.

Channel surgery: each prunable Conv2D / Dense keeps the filters with the largest L1 norm; the
model is rebuilt from its config with fewer filters, the kept weights are copied, and the
layers downstream (BatchNorm, depthwise convs, pooling, Flatten -> Dense) are narrowed to
match. A layer whose output reaches a merge (residual Add, Concatenate), a model output or a
layer we do not know keeps all its channels; the details say which and why. Without copying
weights, the same surgery builds the narrowed student for distillation.

QAT: tfmot starts every activation range at [-6, 6] and moves it as an exponential moving
average with decay 0.999, so a fine-tune of a few hundred steps ends with ranges still near
[-6, 6] (measured on MobileNetV2 after 90 steps: a ReLU6 output seen in [0, 4.5] was quantized
over [-5.5, 5.9], half of its 256 levels unused). `quantize_aware` therefore sets each range
from the calibration samples first, as post-training quantization does, and fine-tuning
starts from PTQ's grid.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import math

import numpy as np

from optimization.base import TechniqueNotApplicable

logger = logging.getLogger(__name__)


def diagnostic(measure, *args):
    """`measure(*args)`, or {"error": ...} when it raises: a diagnostic (e.g. XNNPACK's
    partitions, read through a private LiteRT API) informs the details and never fails a run."""
    try:
        return measure(*args)
    except Exception as exc:  # noqa: BLE001 - by design: any failure is only reported
        logger.warning("diagnostic %s failed", getattr(measure, "__name__", measure), exc_info=True)
        return {"error": f"{type(exc).__name__}: {exc}"}


# ----------------------------------------------------------------------------- weight scales

# "auto" takes per-tensor only for a real saving, not for a few bytes at any accuracy risk
AUTO_MIN_SAVING = 0.05
# the accuracy check runs on at most this many training samples
AUTO_CHECK_SAMPLES = 2000


def smaller_unless_less_accurate(per_channel, per_tensor, dataset, max_drop_pts: float):
    """("per_channel" | "per_tensor", what was measured): the per-tensor file when it is at
    least AUTO_MIN_SAVING smaller and loses at most `max_drop_pts` on training samples (the test
    split is not used); the file not chosen is deleted. One scale per weight tensor saves bytes,
    but where a layer's output channels differ in scale it rounds the small ones away."""
    from optimization.backends.tensorflow import BACKEND
    from optimization.evaluator import accuracy

    check_x, check_y = dataset.x_train[:AUTO_CHECK_SAMPLES], dataset.y_train[:AUTO_CHECK_SAMPLES]
    candidates = {"per_channel": per_channel, "per_tensor": per_tensor}
    measured = {key: {"size_bytes": path.stat().st_size,
                      "train_accuracy": accuracy(BACKEND, path, check_x, check_y)}
                for key, path in candidates.items()}
    saving = 1 - measured["per_tensor"]["size_bytes"] / measured["per_channel"]["size_bytes"]
    drop_pts = 100 * (measured["per_channel"]["train_accuracy"] - measured["per_tensor"]["train_accuracy"])
    chosen = "per_tensor" if saving >= AUTO_MIN_SAVING and drop_pts <= max_drop_pts else "per_channel"
    candidates["per_channel" if chosen == "per_tensor" else "per_tensor"].unlink()
    return chosen, {
        **measured, "per_tensor_saving": round(saving, 4),
        "per_tensor_drop_pts_on_train": round(drop_pts, 2),
        "rule": f"per tensor when >= {AUTO_MIN_SAVING:.0%} smaller and <= {max_drop_pts} pt lower on "
                f"{len(check_x)} training samples (the test split is not used)",
    }


# ----------------------------------------------------------------------------- channel surgery


def narrowed_step_cost(keep_fraction: float, distill: bool = False) -> float:
    """A training step of the model narrowed to `keep_fraction`, as a share of the original's
    (timed on MobileNetV2: 0.58 at half width), plus the teacher's forward pass when
    distilling (0.33)."""
    return 0.15 + 0.85 * float(keep_fraction) + (0.33 if distill else 0.0)


def prune_filters_finetuned(keras_model, dataset, options: dict, progress, span, seed=0):
    """Remove `pruning_ratio` of the filters of every prunable layer, then fine-tune for
    `epochs` with the learning rate cosine-decayed to zero; with `distill`, on the unpruned
    model's soft targets plus the labels (distillation's train_step, the unpruned model as
    teacher), which recovers more of a wide cut than the labels alone."""
    from optimization.backends.tensorflow import adam, count_params_macs, fit, training_steps

    keep_fraction = 1 - float(options["pruning_ratio"])
    progress(span[0], "ranking filters and rebuilding the model", {})
    pruned, surgery = shrink_channels(keras_model, keep_fraction, copy_weights=True)
    epochs, batch_size = int(options["epochs"]), int(options["batch_size"])
    learning_rate, distill = float(options["learning_rate"]), bool(options["distill"])
    trainee = pruned
    if distill:
        trainee = make_distiller(pruned, keras_model, float(options["temperature"]),
                                 float(options["alpha"]))
        trainee.compile(optimizer=adam(learning_rate, training_steps(
            len(dataset.x_train), epochs, batch_size)))
    fit(trainee, dataset.x_train, dataset.y_train, epochs, progress, learning_rate=learning_rate,
        batch_size=batch_size, span=span, compile_model=not distill, cosine=True, seed=seed,
        message="fine-tuning the pruned model" + (" (distilled from the original)" if distill else ""))
    params_before, macs_before = count_params_macs(keras_model)
    params_after, macs_after = count_params_macs(pruned)
    return pruned, {**surgery, "pruning_ratio": float(options["pruning_ratio"]), "epochs": epochs,
                    "channels_kept": channels_kept(surgery),
                    "distilled_from_original": distill, "learning_rate_schedule": "cosine",
                    "params_before": params_before, "params_after": params_after,
                    "macs_before": macs_before, "macs_after": macs_after}


def channels_kept(surgery: dict) -> float:
    """The share of filters kept over the layers whose channels shrank."""
    before = sum(layer["channels_before"] for layer in surgery["pruned_layers"])
    return round(sum(layer["channels_after"] for layer in surgery["pruned_layers"]) / before, 4) if before else 1.0



def _layer_kinds():
    from optimization.backends.keras3_convert import Keras3Activation
    from optimization.backends.tensorflow import keras

    layers = keras.layers
    passthrough = (layers.BatchNormalization, layers.ReLU, layers.Activation, layers.LeakyReLU,
                   layers.ELU, layers.Dropout, layers.SpatialDropout2D, layers.GaussianNoise,
                   layers.MaxPooling2D, layers.AveragePooling2D, layers.GlobalAveragePooling2D,
                   layers.GlobalMaxPooling2D, layers.ZeroPadding2D, layers.Flatten,
                   layers.DepthwiseConv2D, layers.Rescaling, Keras3Activation)
    return keras, passthrough


def _is_prunable(layer, keras) -> bool:
    """Plain convolutions and dense layers own their output channels."""
    return (type(layer) is keras.layers.Conv2D and layer.groups == 1) or type(layer) is keras.layers.Dense


def _graph(model, keras):
    """(layer by name, inbound names by name, output names), in topological order."""
    config = model.get_config()
    layers = {layer.name: layer for layer in model.layers}
    if isinstance(model, keras.Sequential):
        names = [layer.name for layer in model.layers]
        inbound = {name: names[i - 1:i] for i, name in enumerate(names)}
        return layers, inbound, {names[-1]}, config
    inbound = {}
    for entry in config["layers"]:
        nodes = entry.get("inbound_nodes") or []
        if len(nodes) > 1:  # a shared layer: its channels must fit every use, leave it whole
            inbound[entry["name"]] = [None]
        else:
            inbound[entry["name"]] = [item[0] for node in nodes for item in node]
    outputs = {item[0] for item in config["output_layers"]}
    return layers, inbound, outputs, config


def _consumers(inbound: dict[str, list[str]]) -> dict[str, list[str]]:
    """The names of the layers each layer feeds, from `_graph`'s inbound names."""
    consumers: dict[str, list[str]] = {}
    for name, sources in inbound.items():
        for source in sources:
            consumers.setdefault(source, []).append(name)
    return consumers


def _blocker(name, layers, consumers, inbound, outputs, passthrough, keras) -> str | None:
    """Why the channels of `name` cannot shrink, or None when every path downstream ends in a
    conv/dense layer through layers that simply follow the channels."""
    if name in outputs:
        return "its output is a model output"
    for consumer in consumers.get(name, []):
        layer = layers[consumer]
        if len(inbound[consumer]) != 1:
            return f"it feeds {type(layer).__name__} '{consumer}', which merges several inputs"
        if _is_prunable(layer, keras):
            continue
        if isinstance(layer, keras.layers.DepthwiseConv2D) and layer.depth_multiplier != 1:
            return f"it feeds depthwise '{consumer}' with depth_multiplier {layer.depth_multiplier}"
        if not isinstance(layer, passthrough):
            return f"it feeds {type(layer).__name__} '{consumer}', which surgery does not handle"
        reason = _blocker(consumer, layers, consumers, inbound, outputs, passthrough, keras)
        if reason:
            return reason
    return None


def shrink_channels(model, keep_fraction: float, copy_weights: bool):
    """Rebuild `model` with `keep_fraction` of the filters in every layer whose channels can
    shrink. With copy_weights, the kept filters (largest L1 norm) keep their trained weights;
    without, the narrowed model is freshly initialized (a distillation student)."""
    from optimization.backends.tensorflow import finalize_preprocessing_state

    keras, passthrough = _layer_kinds()
    if not isinstance(model, keras.Sequential) and type(model) is not keras.Model and \
            type(model).__name__ != "Functional":
        raise TechniqueNotApplicable(
            f"{type(model).__name__} is a subclassed model; channel surgery needs a Sequential "
            "or functional Keras model")
    layers, inbound, outputs, config = _graph(model, keras)
    consumers = _consumers(inbound)

    kept_channels, pruned, kept_whole = {}, [], []
    for name, layer in layers.items():
        if isinstance(layer, keras.Model):
            raise TechniqueNotApplicable(
                f"the model nests another model ('{name}'); save the inner model flat to prune it")
        if not _is_prunable(layer, keras):
            continue
        reason = _blocker(name, layers, consumers, inbound, outputs, passthrough, keras)
        if reason:
            kept_whole.append({"layer": name, "why": reason})
            continue
        kernel = layer.get_weights()[0]
        norms = np.abs(kernel).reshape(-1, kernel.shape[-1]).sum(axis=0)
        keep = max(1, int(round(len(norms) * keep_fraction)))
        kept_channels[name] = np.sort(np.argsort(norms)[::-1][:keep])
        pruned.append({"layer": name, "channels_before": len(norms), "channels_after": keep})
    if not pruned:
        raise TechniqueNotApplicable(
            "no layer's channels can shrink: every conv/dense output reaches a merge, a model "
            "output or a layer channel surgery does not handle ("
            + "; ".join(f"{k['layer']}: {k['why']}" for k in kept_whole) + ")")

    for entry in config["layers"]:
        layer_config = entry["config"]
        if layer_config["name"] in kept_channels:
            key = "filters" if "filters" in layer_config else "units"
            layer_config[key] = len(kept_channels[layer_config["name"]])
    rebuilt = type(model).from_config(config) if isinstance(model, keras.Sequential) \
        else keras.Model.from_config(config)
    if copy_weights:
        _copy_kept_weights(model, rebuilt, layers, inbound, kept_channels, passthrough, keras)
        finalize_preprocessing_state(rebuilt)
    return rebuilt, {"pruned_layers": pruned, "kept_whole": kept_whole}


def _copy_kept_weights(model, rebuilt, layers, inbound, kept_channels, passthrough, keras):
    """Slice each layer's weights to the channels that survive upstream (inputs) and its own
    kept filters (outputs); channels flow through pass-through layers in topological order."""
    channels: dict[str, np.ndarray | None] = {}
    for name, layer in layers.items():
        source = inbound[name][0] if len(inbound[name]) == 1 else None
        incoming = channels.get(source)
        own = kept_channels.get(name)
        if isinstance(layer, keras.layers.Flatten) and incoming is not None:
            positions = int(np.prod(layer.input_shape[1:-1]))
            width = int(layer.input_shape[-1])
            incoming = (np.arange(positions)[:, None] * width + incoming[None, :]).ravel()
        channels[name] = own if own is not None else (
            incoming if isinstance(layer, passthrough) else None)
        weights = layer.get_weights()
        if not weights:
            continue
        if _is_prunable(layer, keras):
            kernel = weights[0]
            if incoming is not None:
                kernel = np.take(kernel, incoming, axis=-2)
            if own is not None:
                kernel = np.take(kernel, own, axis=-1)
                weights = [kernel] + [np.take(w, own, axis=0) for w in weights[1:]]
            else:
                weights = [kernel] + weights[1:]
        elif incoming is not None and isinstance(layer, keras.layers.DepthwiseConv2D):
            weights = [np.take(weights[0], incoming, axis=2)] + [
                np.take(w, incoming, axis=0) for w in weights[1:]]
        elif incoming is not None:  # BatchNormalization: every vector is per channel
            weights = [np.take(w, incoming, axis=0) for w in weights]
        rebuilt.get_layer(name).set_weights(weights)


# ----------------------------------------------------------------------------- INT8 input normalization


def normalization_as_affine(model, check_x):
    """`model` with each adapted per-channel Normalization of an image (and a Rescaling just
    before it) rewritten as the one per-channel affine x * scale + offset it computes, a 1x1
    DepthwiseConv2D, for conversion to INT8; and what was rewritten.

    Why: the INT8 converter quantizes a Normalization's SUB (x - mean) on the grid of the DIV
    after it, whose range is 1 / std times wider when std < 1 (mean 0.5, variance 0.08 after a
    Rescaling(1/255)): every image reaches the network on ~256 * std levels, 3.4 gray levels a
    step whatever its contrast, instead of every gray level. The single op gets its own
    calibrated range, and integer pixels keep their levels. A Normalization with mean 0 and
    variance 1 (EfficientNet's) is left alone: the converter drops it. Each rewrite must give
    the original's outputs on `check_x` (CONVERSION_TOLERANCE), else the model is returned as
    it was."""
    from optimization.backends.keras3_convert import max_output_difference
    from optimization.backends.tensorflow import (
        CONVERSION_CHECK_SAMPLES, CONVERSION_TOLERANCE, finalize_preprocessing_state, keras)

    if not isinstance(model, keras.Sequential) and not getattr(model, "_is_graph_network", False):
        return model, []
    layers, inbound, outputs, config = _graph(model, keras)
    consumers = _consumers(inbound)
    folds = {}  # Normalization name -> the layers it stands for, first to last
    for name, layer in layers.items():
        if not _per_channel_normalization(layer, keras) or len(inbound[name]) != 1:
            continue
        source = layers.get(inbound[name][0])
        chain = [name]
        if isinstance(source, keras.layers.Rescaling) and consumers[source.name] == [name] \
                and source.name not in outputs and len(inbound[source.name]) <= 1:
            chain.insert(0, source.name)
        folds[name] = chain
    if not folds:
        return model, []

    entries = config["layers"]
    folded_away = {chain[0] for chain in folds.values() if len(chain) == 2}
    affine = {}
    for entry in entries:
        name = entry["config"]["name"]
        if name not in folds:
            continue
        chain = [layers[layer_name] for layer_name in folds[name]]
        channels = int(chain[-1].input_shape[-1])
        scale, offset = _affine_of(chain, channels)
        affine[name] = [scale.reshape(1, 1, channels, 1), offset]
        entry["class_name"] = "DepthwiseConv2D"
        entry["config"] = {"name": name, "kernel_size": 1, "use_bias": True,
                           "dtype": entry["config"].get("dtype", "float32")}
        if len(folds[name]) == 2 and "inbound_nodes" in entry:
            entry["inbound_nodes"] = next(e["inbound_nodes"] for e in entries
                                          if e["config"]["name"] == folds[name][0])
    config["layers"] = [e for e in entries if e["config"]["name"] not in folded_away]
    rebuilt = type(model).from_config(config) if isinstance(model, keras.Sequential) \
        else keras.Model.from_config(config)
    for layer in rebuilt.layers:
        weights = affine.get(layer.name) or layers[layer.name].get_weights()
        if weights:
            layer.set_weights(weights)
    finalize_preprocessing_state(rebuilt)
    difference = max_output_difference(model, rebuilt, np.asarray(check_x)[:CONVERSION_CHECK_SAMPLES])
    if not difference <= CONVERSION_TOLERANCE:
        logger.warning("Normalization as an affine op differs by %.2g; converting it as it is",
                       difference)
        return model, []
    return rebuilt, [{"layers": chain, "as": "DepthwiseConv2D 1x1 (x * scale + offset)",
                      "max_abs_difference": difference} for chain in folds.values()]


def _per_channel_normalization(layer, keras) -> bool:
    """An adapted (or given) Normalization over the channels of an NHWC image, not the identity."""
    if type(layer) is not keras.layers.Normalization or len(layer.input_shape) != 4:
        return False
    if tuple(a % 4 for a in layer.axis) != (3,):
        return False
    mean, variance = np.asarray(layer.mean), np.asarray(layer.variance)
    return not (np.all(mean == 0) and np.all(variance == 1))


def _affine_of(chain, channels: int):
    """(scale, offset) per channel of the affine map the Rescaling and Normalization layers of
    `chain` compute one after another, in float64 (read from float32 outputs, the scale of a
    low-contrast image's normalization loses digits to cancellation)."""
    from optimization.backends.tensorflow import keras

    scale, offset = np.ones(channels), np.zeros(channels)
    for layer in chain:
        if isinstance(layer, keras.layers.Rescaling):
            step, shift = np.asarray(layer.scale, np.float64), np.asarray(layer.offset, np.float64)
        else:
            std = np.maximum(np.sqrt(np.asarray(layer.variance, np.float64)), keras.backend.epsilon())
            mean = np.asarray(layer.mean, np.float64)
            step, shift = (std, mean) if layer.invert else (1 / std, -mean / std)
        scale, offset = scale * step, offset * step + shift
    return (np.broadcast_to(scale, (1, 1, 1, channels)).ravel().astype(np.float32),
            np.broadcast_to(offset, (1, 1, 1, channels)).ravel().astype(np.float32))


# ----------------------------------------------------------------------------- distillation


def narrowed_student(teacher, width: float, seed: int, init: str):
    """The teacher narrowed to `width`: with `init` "teacher", keeping the teacher's weights on
    the filters kept (as channel pruning does); with "random", freshly initialized and so
    trained from scratch on a short budget, its BatchNorm statistics following the batches
    faster."""
    from optimization.backends.tensorflow import follow_batchnorm_faster, keras

    keras.utils.set_random_seed(seed)
    from_teacher = init == "teacher"
    student, surgery = shrink_channels(teacher, width, copy_weights=from_teacher)
    return (student if from_teacher else follow_batchnorm_faster(student)), surgery


def make_distiller(student, teacher, temperature: float, alpha: float):
    """A Keras model whose train_step mixes the KL divergence to the teacher's softened outputs
    (scaled by T^2, as in Hinton et al.) with cross-entropy on the labels."""
    from optimization.backends.tensorflow import keras, outputs_probabilities, tf

    def logits(model, outputs):
        return tf.math.log(tf.clip_by_value(outputs, 1e-8, 1.0)) if outputs_probabilities(model) \
            else outputs

    class Distiller(keras.Model):
        def __init__(self):
            super().__init__()
            self.student, self.teacher = student, teacher
            self.loss_tracker = keras.metrics.Mean(name="loss")
            self.accuracy = keras.metrics.SparseCategoricalAccuracy(name="accuracy")

        @property
        def metrics(self):
            return [self.loss_tracker, self.accuracy]

        def call(self, x, training=False):
            return self.student(x, training=training)

        def train_step(self, data):
            x, y = data
            soft_targets = tf.nn.softmax(logits(teacher, self.teacher(x, training=False)) / temperature)
            with tf.GradientTape() as tape:
                student_logits = logits(student, self.student(x, training=True))
                soft = keras.losses.kl_divergence(
                    soft_targets, tf.nn.softmax(student_logits / temperature)) * temperature ** 2
                hard = keras.losses.sparse_categorical_crossentropy(y, student_logits, from_logits=True)
                loss = tf.reduce_mean(alpha * soft + (1 - alpha) * hard)
            variables = self.student.trainable_variables
            self.optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
            self.loss_tracker.update_state(loss)
            self.accuracy.update_state(y, student_logits)
            return {metric.name: metric.result() for metric in self.metrics}

    return Distiller()


# ----------------------------------------------------------------------------- magnitude pruning


# wrapping every layer for pruning makes building the train step ~4x as long (timed)
PRUNING_SETUP = 4.0
# Layers with fewer weights than this stay dense: pruning them saves next to nothing, and each
# of their weights carries more of the signal (a first 3x3 convolution over RGB, a thin
# network's early 1x1 projections). On MobileNetV2 alpha 0.35 (32x32 digits, 50% target,
# 8 epochs) keeping its eight such layers dense (3,248 of 371k conv weights) took the drop from
# 1.67 pts to 0.28 at the same overall sparsity (47%).
MIN_PRUNED_LAYER_WEIGHTS = 1024



def prune_magnitude_finetuned(keras_model, dataset, options: dict, progress, span, seed=0,
                              cosine: bool = False):
    """Magnitude-prune every prunable layer to `target_sparsity` while fine-tuning (with
    `cosine`, the learning rate decays to zero over the run, so the last epochs at full
    sparsity settle the weights); return the stripped (plain Keras) model and what was
    reached."""
    import tensorflow_model_optimization as tfmot

    from optimization.backends.tensorflow import fit, nonzero_fraction

    target = float(options["target_sparsity"])
    if not 0.0 < target < 1.0:
        raise ValueError(f"target_sparsity must be between 0 and 1, not {target}")
    epochs, batch_size = int(options["epochs"]), int(options["batch_size"])
    steps = epochs * math.ceil(len(dataset.x_train) / batch_size)
    # reach the target after ~70% of the steps (in 10 increments), then recover at that sparsity
    frequency = max(1, int(0.7 * steps) // 10)
    end_step = frequency * min(10, max(0, (steps - 1) // frequency))
    schedule = tfmot.sparsity.keras.PolynomialDecay(
        initial_sparsity=0.0, final_sparsity=target, begin_step=0, end_step=end_step,
        frequency=frequency)
    wrapped, not_pruned, kept_dense = _wrapped_for_pruning(keras_model, schedule)
    fit(wrapped, dataset.x_train, dataset.y_train, epochs, progress,
        learning_rate=float(options["learning_rate"]), batch_size=batch_size, span=span,
        message=f"pruning to {target:.0%} sparsity", seed=seed, cosine=cosine,
        callbacks=[tfmot.sparsity.keras.UpdatePruningStep()])
    stripped = tfmot.sparsity.keras.strip_pruning(wrapped)
    details = {"target_sparsity": target, "sparsity": round(1 - nonzero_fraction(stripped), 4),
               "sparsity_scope": "kernels of conv and dense layers", "epochs": epochs,
               "learning_rate_schedule": "cosine" if cosine else "constant"}
    if not_pruned:
        details["layers_not_pruned"] = not_pruned
    if kept_dense:
        details["small_layers_kept_dense"] = {
            "layers": kept_dense,
            "why": f"fewer than {MIN_PRUNED_LAYER_WEIGHTS} weights: little to save, and the most "
                   "sensitive to pruning"}
    return stripped, details


def _wrapped_for_pruning(keras_model, schedule):
    """A copy of `keras_model` (tfmot's wrappers would otherwise prune the caller's own
    weights in place) with every layer tfmot can prune wrapped, except those with fewer than
    MIN_PRUNED_LAYER_WEIGHTS weights to prune; the names of the layers with weights it cannot
    prune (left as they are, e.g. Rescaling or a nested model), and of the small ones kept dense."""
    import tensorflow_model_optimization as tfmot
    from tensorflow_model_optimization.python.core.sparsity.keras import prune_registry

    from optimization.backends.tensorflow import finalize_preprocessing_state, keras

    if not isinstance(keras_model, keras.Sequential) and not getattr(keras_model, "_is_graph_network", False):
        raise TechniqueNotApplicable(
            f"{type(keras_model).__name__} is a subclassed model; pruning needs a Sequential or "
            "functional Keras model")
    copy = keras.models.clone_model(keras_model)
    copy.set_weights(keras_model.get_weights())
    finalize_preprocessing_state(copy)
    not_pruned, kept_dense = [], []

    def wrap(layer):
        if isinstance(layer, keras.layers.InputLayer):
            return layer.__class__.from_config(layer.get_config())
        if prune_registry.PruneRegistry.supports(layer) or hasattr(layer, "get_prunable_weights"):
            prunable = _prunable_weight_count(layer)
            if prunable is not None and 0 < prunable < MIN_PRUNED_LAYER_WEIGHTS:
                kept_dense.append(layer.name)
                return layer
            return tfmot.sparsity.keras.prune_low_magnitude(layer, pruning_schedule=schedule)
        if layer.weights:
            not_pruned.append(layer.name)
        return layer

    return keras.models.clone_model(copy, clone_function=wrap), not_pruned, kept_dense


def _prunable_weight_count(layer) -> int | None:
    """The weights tfmot would prune in `layer` (its kernels; none in a BatchNormalization or
    a DepthwiseConv2D, which tfmot leaves dense), or None where its registry names them in a
    form not read here (recurrent cells, attention): such a layer is pruned whatever its size."""
    from tensorflow_model_optimization.python.core.sparsity.keras import prune_registry

    if hasattr(layer, "get_prunable_weights"):
        return sum(int(np.prod(weight.shape)) for weight in layer.get_prunable_weights())
    names = prune_registry.PruneRegistry._LAYERS_WEIGHTS_MAP.get(type(layer))
    if names is None or any("." in name for name in names):
        return None
    return sum(int(np.prod(getattr(layer, name).shape)) for name in names)


# ----------------------------------------------------------------------------- quantization-aware training


# MovingAverageQuantizer's decay, fixed inside tfmot (quantizers.py); the calibration reads the
# range each sample batch moved the average towards through it
TFMOT_EMA_DECAY = 0.999
CALIBRATION_BATCH = 64


# timed: building the fake-quant model and its train step takes ~3x a plain model's, and
# converting it ~3x a plain conversion
QAT_SETUP = 3.0
QAT_CONVERSION = 3.0



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

    from optimization.backends.tensorflow import finalize_preprocessing_state, keras

    quantization = tfmot.quantization.keras
    scheme_args = (scheme,) if scheme is not None else ()
    try:
        return finalize_preprocessing_state(quantization.quantize_apply(
            quantization.quantize_annotate_model(keras_model), *scheme_args)), []
    except (ValueError, RuntimeError):
        registry = default_8bit_quantize_registry.Default8BitQuantizeRegistry()
        fused = _batchnorms_folded_by_tfmot(keras_model, registry, keras)

        def output_only(layer) -> bool:
            return not layer.trainable_weights and not isinstance(layer, keras.layers.InputLayer)

        skipped = [layer.name for layer in keras_model.layers
                   if layer.weights and not _quantizable(layer, registry, keras)
                   and layer.name not in fused and not output_only(layer)]

        def annotate(layer):
            """Supported layers as tfmot's registry says, and the BatchNormalization layers its
            transforms fold into the conv before them (left out, the conv's output would be
            rounded before the BatchNorm, which then stays a float MUL and ADD pair in the
            INT8 file). Other layers without trainable weights (a Keras 3 model's
            Keras3Activation, Rescaling, a Normalization with its fixed mean and variance)
            get their output quantized, as the INT8 conversion will (left unannotated,
            tfmot's prune-preserving scheme raises on them); layers with trainable weights
            tfmot does not know stay float."""
            clone = layer.__class__.from_config(layer.get_config())
            if _quantizable(layer, registry, keras) or layer.name in fused:
                return quantization.quantize_annotate_layer(clone)
            if output_only(layer):
                return quantization.quantize_annotate_layer(clone, output_quantize_config())
            return clone

        annotated = keras.models.clone_model(keras_model, clone_function=annotate)
        annotated.set_weights(keras_model.get_weights())
        return finalize_preprocessing_state(quantization.quantize_apply(annotated, *scheme_args)), skipped


# tfmot's 8-bit layout transforms fold a BatchNormalization into the one layer before it when
# that layer is one of these with a linear activation and the BatchNorm is its only consumer
TFMOT_BATCHNORM_FOLDED_AFTER = frozenset({"Conv2D", "DepthwiseConv2D", "Dense"})


def _batchnorms_folded_by_tfmot(keras_model, registry, keras) -> set[str]:
    """The BatchNormalization layers of `keras_model` that tfmot's transforms fold into the
    quantized conv / dense layer before them (as the whole-model annotation does, and as the
    INT8 converter folds them)."""
    layers, inbound, outputs, _ = _graph(keras_model, keras)
    consumers = _consumers(inbound)
    folded = set()
    for name, layer in layers.items():
        if type(layer).__name__ not in ("BatchNormalization", "SyncBatchNormalization") \
                or len(inbound[name]) != 1:
            continue
        source = layers.get(inbound[name][0])
        activation = getattr(getattr(source, "activation", None), "__name__", None)
        if type(source).__name__ in TFMOT_BATCHNORM_FOLDED_AFTER and activation == "linear" \
                and _quantizable(source, registry, keras) and consumers[source.name] == [name] \
                and source.name not in outputs:
            folded.add(name)
    return folded


# activations tfmot's default 8-bit scheme quantizes: in an Activation layer
# (Default8BitActivationQuantizeConfig) and inside a conv / dense layer (QuantizeAwareActivation);
# others (a Keras 3 model's hard_silu, say) make quantize_apply raise
TFMOT_ACTIVATION_LAYER_ACTIVATIONS = frozenset({"relu", "swish", "gelu", "relu6", "linear",
                                                "softmax", "sigmoid", "tanh"})
TFMOT_FUSED_ACTIVATIONS = frozenset({"linear", "relu", "swish", "gelu", "softmax", "sigmoid", "tanh"})


def output_quantize_config():
    """A tfmot QuantizeConfig for a weightless layer whose output is quantized to 8 bits
    (asymmetric, per tensor, moving-average range: tfmot's choice for an Activation)."""
    return _output_quantize_config_class()()


@functools.cache  # defined (and registered for saving) once, when QAT first needs it
def _output_quantize_config_class():
    from tensorflow_model_optimization.python.core.quantization.keras import (
        quantize_config, quantizers)

    from optimization.backends.tensorflow import keras

    @keras.saving.register_keras_serializable(package="edgeopt")
    class OutputQuantizeConfig(quantize_config.QuantizeConfig):
        def get_weights_and_quantizers(self, layer):
            return []

        def get_activations_and_quantizers(self, layer):
            return []

        def set_quantize_weights(self, layer, quantize_weights):
            pass

        def set_quantize_activations(self, layer, quantize_activations):
            pass

        def get_output_quantizers(self, layer):
            return [quantizers.MovingAverageQuantizer(num_bits=8, per_axis=False,
                                                      symmetric=False, narrow_range=False)]

        def get_config(self):
            return {}

    return OutputQuantizeConfig


def _quantizable(layer, registry, keras) -> bool:
    if not registry.supports(layer):
        return False
    activation = getattr(layer, "activation", None)
    if activation is None:
        return True
    name = getattr(activation, "__name__", type(activation).__name__)
    allowed = TFMOT_ACTIVATION_LAYER_ACTIVATIONS if isinstance(layer, keras.layers.Activation) \
        else TFMOT_FUSED_ACTIVATIONS
    return name in allowed


def calibrate_activation_ranges(model, x) -> int:
    """Set every moving-average range of the QAT `model` to the min / max its tensor takes on
    `x` in the float network (in training mode, as fine-tuning sees it), as post-training
    calibration measures them.

    The forward passes run with tfmot's fake quantization off (`_fake_quantization_off`): were
    each tensor rounded on the range it starts from while the ranges are measured, every range
    would be read from a signal the ranges before it had already distorted. tfmot starts them
    at [-6, 6], whose 256 levels zero out a tensor of small magnitude (EfficientNet's input
    after its Rescaling(1/255) lies in [0, 0.004]): everything downstream was then calibrated
    on a constant, and the QAT model started at chance.

    Every range starts at 0; each batch's pass moves it towards that batch's extremes by
    1 - TFMOT_EMA_DECAY, which is read back, and the state the pass changed (ranges, BatchNorm
    statistics) is put back; the widest extremes over all batches are assigned. The other
    quantizers' variables (weight ranges, set from the weights on every step; the input layer's
    all-values range) keep what the passes set. Returns the number of ranges set."""
    ranges, other_quantizer_vars = _quantizer_variables(model)
    owned = {variable.ref() for pair in ranges for variable in pair} | {v.ref() for v in other_quantizer_vars}
    # a forward pass changes no trainable weight: only these need putting back
    moved = [variable for variable in model.non_trainable_weights if variable.ref() not in owned]
    moved_values = [variable.numpy() for variable in moved]
    x = np.asarray(x, dtype=np.float32)
    for low_var, high_var in ranges:
        low_var.assign(np.zeros(low_var.shape, np.float32))
        high_var.assign(np.zeros(high_var.shape, np.float32))
    low = [np.zeros(low_var.shape) for low_var, _ in ranges]
    high = [np.zeros(high_var.shape) for _, high_var in ranges]
    with _fake_quantization_off():
        for start in range(0, len(x), CALIBRATION_BATCH):
            model(x[start:start + CALIBRATION_BATCH], training=True)
            for index, (low_var, high_var) in enumerate(ranges):
                low[index] = np.minimum(low[index], low_var.numpy() / (1 - TFMOT_EMA_DECAY))
                high[index] = np.maximum(high[index], high_var.numpy() / (1 - TFMOT_EMA_DECAY))
                low_var.assign(np.zeros(low_var.shape, np.float32))
                high_var.assign(np.zeros(high_var.shape, np.float32))
            for variable, value in zip(moved, moved_values):
                variable.assign(value)
    for (low_var, high_var), low_value, high_value in zip(ranges, low, high):
        low_var.assign(np.asarray(low_value, dtype=np.float32))
        high_var.assign(np.asarray(high_value, dtype=np.float32))
    return len(ranges)


@contextlib.contextmanager
def _fake_quantization_off():
    """Inside, tfmot's quantizers pass their input through unrounded while still moving their
    ranges: the model computes in float and every range sees its float tensor. (Every tfmot
    quantizer rounds through `quant_ops._FakeQuantWithMinMaxVars`, or `FixedQuantize` for a
    fixed range; both are looked up on the module at each call.)"""
    from tensorflow_model_optimization.python.core.quantization.keras import quant_ops

    originals = quant_ops._FakeQuantWithMinMaxVars, quant_ops.FixedQuantize
    quant_ops._FakeQuantWithMinMaxVars = lambda inputs, *args, **kwargs: inputs
    quant_ops.FixedQuantize = lambda inputs, *args, **kwargs: inputs
    try:
        yield
    finally:
        quant_ops._FakeQuantWithMinMaxVars, quant_ops.FixedQuantize = originals


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
