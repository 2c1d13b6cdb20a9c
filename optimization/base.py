"""The technique contract and the small types every part of the engine shares.

No Django import anywhere below `optimization/`: the engine is driven through plain
callables (a progress function, a sink) so it can run in a worker, a test or a script.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Protocol

from optimization.catalog import FRAMEWORKS, RESULT_FIELDS, TECHNIQUES, check_result_field, validate_options

__all__ = ["FRAMEWORKS", "TECHNIQUES"]  # re-exported: the catalog declares them
# the array layout each framework's models take (and its datasets are loaded in)
LAYOUTS = {"pytorch": "NCHW", "tensorflow": "NHWC"}


class ExperimentStopped(Exception):
    """Raised from a progress callback when the user stopped the experiment."""


class TechniqueNotApplicable(Exception):
    """A technique cannot apply to this model; the message is the reason shown to the user."""


class UnsafeModelError(ValueError):
    """An uploaded file would run code (or escape storage) if loaded; refused before loading."""


class InvalidInputError(ValueError):
    """An uploaded model or dataset is malformed; the message says what to upload instead."""


# progress(fraction_of_this_technique, message, metrics) -> None; raises ExperimentStopped.
ProgressFn = Callable[[float, str, dict], None]


@dataclass
class LoadedModel:
    """A model in memory plus what the engine must know to run it.

    `module` is the framework object (torch.nn.Module / torch.export.ExportedProgram-derived
    module, or a Keras model). `input_shape` is one sample's shape in the model's own layout
    (e.g. (1, 8, 8) for NCHW PyTorch, (8, 8, 1) for NHWC Keras); it comes from the model
    (export signature, Keras input) or from the user, never guessed.
    """

    framework: str
    module: Any
    input_shape: tuple[int, ...]
    num_classes: int | None = None
    source_path: Path | None = None
    source_format: str = ""  # "pt2", "pt", "pth", "onnx", "keras", "h5", "savedmodel"
    architecture: str | None = None
    # Only the post-training techniques accept a model the engine cannot train (ONNX).
    trainable: bool = True
    # What loading did to make the model usable (e.g. a fixed-batch export generalised to any
    # batch); techniques copy it into their details.
    preparation: dict = field(default_factory=dict)


@dataclass
class TechniqueConfig:
    """Budgets and knobs for one technique run, plus where to write artifacts.

    `options` holds the experiment's overrides for this technique; `BaseOptimization.options`
    checks them against the catalog and merges them over its defaults.
    """

    output_dir: Path
    options: dict = field(default_factory=dict)
    seed: int = 0

    def get(self, key: str, default: Any = None) -> Any:
        return self.options.get(key, default)


@dataclass
class OptimizedResult:
    """What a technique produced. Evaluation is not its job: the evaluator measures the
    deploy artifact the same way for every technique, so the numbers compare.

    artifacts: {"deploy": path to .onnx / .tflite, "native": path to .pt2 / .keras};
    `model` is the optimized framework model when one exists (used by the analyzer);
    the typed fields after `macs` are the common vocabulary (catalog.RESULT_FIELDS), named the
    same in both frameworks and filled with `record`; details keep each technique's extras
    (layers kept wider and why, the granularity choice, ...).
    """

    artifacts: dict[str, Path]
    details: dict = field(default_factory=dict)
    model: Any = None
    params: int | None = None
    macs: int | None = None
    precision: str | None = None
    bits_per_layer: dict | None = None
    float_layers: list | None = None
    sparsity: float | None = None
    channels_kept: float | None = None
    epochs: int | None = None
    calibration_samples: int | None = None
    compressed_size_bytes: int | None = None

    def record(self, **values) -> OptimizedResult:
        """Set vocabulary fields, type-checked against the catalog."""
        for name, value in values.items():
            check_result_field(name, value)
            setattr(self, name, value)
        return self

    def record_weight_bits(self) -> OptimizedResult:
        """bits_per_layer and float_layers read from the deploy file: the weight storage of
        each weighted kernel, as the runtime sees it (the same reader for ONNX and .tflite)."""
        from optimization.graph import WEIGHTED_CLASSES, load_graph

        bits = {op.name: op.weight_bits for op in load_graph(self.artifacts["deploy"]).ops
                if op.kind in WEIGHTED_CLASSES and op.params}
        return self.record(bits_per_layer=bits, float_layers=[name for name, b in bits.items() if b >= 32])

    def vocabulary(self) -> dict:
        """The common fields that were filled."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name in RESULT_FIELDS and getattr(self, f.name) is not None}


class BaseOptimization:
    name: str = ""
    framework: str = ""
    # True for techniques that only transform weights (may run on an ONNX upload).
    post_training: bool = False

    def requires_dataset(self) -> bool:
        return True

    def estimate_time(self, model_info: dict, config: TechniqueConfig) -> float:
        """Seconds this run should take; used for the ETA. model_info has params, macs,
        train_samples, calib_samples and layers (ops in the FP32 deploy file; absent or None
        when unknown)."""
        raise NotImplementedError

    def optimize(
        self, model: LoadedModel, config: TechniqueConfig, dataset, progress: ProgressFn
    ) -> OptimizedResult:
        raise NotImplementedError

    def options(self, config: TechniqueConfig) -> dict:
        """The catalog's defaults for this technique and framework with the experiment's
        overrides on top; catalog.OptionError (a ValueError) names an unknown option and the
        allowed ones, or says what a bad value must be."""
        return validate_options(self.name, self.framework, config.options)


class Backend(Protocol):
    """What each framework backend provides; the evaluator and orchestrator use only this."""

    framework: str
    deploy_suffix: str  # ".onnx" / ".tflite"
    native_suffix: str  # ".pt2" / ".keras"

    def load(self, path: Path, input_shape: tuple | None = None,
             architecture: str | None = None, num_classes: int | None = None) -> LoadedModel: ...

    def export_deploy(self, model: LoadedModel, path: Path) -> Path: ...

    def save_native(self, model: LoadedModel, path: Path) -> Path: ...

    def predict(self, deploy_path: Path, x) -> Any: ...  # numpy logits, batch in model layout

    def latency_invoker(self, deploy_path: Path, sample) -> Callable[[], object]: ...  # one batch-1 run

    def latency_ms(self, deploy_path: Path, sample) -> float: ...  # steady batch-1 latency
