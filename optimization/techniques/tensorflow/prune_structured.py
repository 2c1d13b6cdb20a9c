"""Structured (filter) pruning by surgery on the Keras graph: tfmot has no channel pruning.

Each prunable Conv2D / Dense keeps the filters with the largest L1 norm; the model is rebuilt
from its config with fewer filters, the kept weights are copied, and the layers downstream
(BatchNorm, depthwise convs, pooling, Flatten -> Dense) are narrowed to match. A layer whose
output reaches a merge (residual Add, Concatenate), a model output or a layer we do not know
keeps all its channels; the details say which and why. Then the model is fine-tuned with a
cosine-decayed rate, by default distilled from the unpruned model (its soft targets plus the
labels, distillation's train_step). (Ranking filters by their BatchNorm-folded norm instead
was tried on MobileNetV2 and recovered worse than the plain L1 norm.)
The same surgery, without copying weights, builds the narrowed student for distillation.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from optimization.base import BaseOptimization, OptimizedResult, TechniqueConfig, TechniqueNotApplicable


class Technique(BaseOptimization):
    name = "prune_structured"
    framework = "tensorflow"

    def estimate_time(self, model_info: dict, config: TechniqueConfig) -> float:
        from optimization.backends.tensorflow import conversion_seconds, training_seconds

        options = self.options(config)
        step = narrowed_step_cost(1 - options["pruning_ratio"], options["distill"])
        return training_seconds(model_info, options["epochs"], step=step) + conversion_seconds(model_info)

    def optimize(self, model, config, dataset, progress) -> OptimizedResult:
        from optimization.backends.tensorflow import convert_to_tflite, technique_result

        pruned, details = prune_filters_finetuned(model.module, dataset, self.options(config),
                                                  progress, span=(0.05, 0.9), seed=config.seed)
        progress(0.9, "converting to .tflite", {})
        deploy = convert_to_tflite(pruned, Path(config.output_dir) / f"{self.name}.tflite")
        return technique_result(self.name, config, pruned, deploy, details).record(
            precision="fp32", channels_kept=details.pop("channels_kept"), epochs=details.pop("epochs"))


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
    from optimization.techniques.tensorflow.distillation import make_distiller

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


# ----------------------------------------------------------------------------- surgery


def _layer_kinds():
    from optimization.backends.tensorflow import keras

    layers = keras.layers
    passthrough = (layers.BatchNormalization, layers.ReLU, layers.Activation, layers.LeakyReLU,
                   layers.ELU, layers.Dropout, layers.SpatialDropout2D, layers.GaussianNoise,
                   layers.MaxPooling2D, layers.AveragePooling2D, layers.GlobalAveragePooling2D,
                   layers.GlobalMaxPooling2D, layers.ZeroPadding2D, layers.Flatten,
                   layers.DepthwiseConv2D)
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
    keras, passthrough = _layer_kinds()
    if not isinstance(model, keras.Sequential) and type(model) is not keras.Model and \
            type(model).__name__ != "Functional":
        raise TechniqueNotApplicable(
            f"{type(model).__name__} is a subclassed model; channel surgery needs a Sequential "
            "or functional Keras model")
    layers, inbound, outputs, config = _graph(model, keras)
    consumers: dict[str, list[str]] = {}
    for name, sources in inbound.items():
        for source in sources:
            consumers.setdefault(source, []).append(name)

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
