"""The technique contract and the small types every part of the engine shares.

No Django import anywhere below `optimization/`: the engine is driven through plain
callables (a progress function, a sink) so it can run in a worker, a test or a script.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

FRAMEWORKS = ("pytorch", "tensorflow")
TECHNIQUES = (
    "ptq_int8",
    "ptq_int4",
    "prune_unstructured",
    "prune_structured",
    "distillation",
    "qat",
    "hybrid",
)


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
    # Only the post-training techniques accept a model the engine cannot train (ONNX, a
    # SavedModel without Keras metadata); `not_trainable_reason` says why, for the skipped runs.
    trainable: bool = True
    not_trainable_reason: str = ""
    # What loading did to make the model usable (e.g. a fixed-batch export generalised to any
    # batch); techniques copy it into their details.
    preparation: dict = field(default_factory=dict)
    # The model as uploaded when `module` is a converted copy of it (Keras 3 -> tf_keras),
    # until the backend's `verify_conversion` has compared the two on the calibration samples.
    source_module: Any = None


@dataclass
class TechniqueConfig:
    """Budgets and knobs for one technique run, plus where to write artifacts.

    `options` holds the experiment's per-technique config merged over the technique's defaults
    (epochs, learning_rate, target_sparsity, temperature, ...).
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
    details: what it did (sparsity reached, bits, epochs, layers kept wider and why, ...).
    """

    artifacts: dict[str, Path]
    details: dict = field(default_factory=dict)
    model: Any = None
    params: int | None = None
    macs: int | None = None


class BaseOptimization:
    name: str = ""
    framework: str = ""
    # True for techniques that only transform weights (may run on an ONNX upload).
    post_training: bool = False
    defaults: dict = {}

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
        """The technique's defaults with the experiment's overrides on top."""
        return {**self.defaults, **config.options}


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
