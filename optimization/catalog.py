"""The one declaration of what EdgeOpt takes and reports: techniques and their typed options,
constraints, goals, devices, plans, accepted file suffixes and the common result vocabulary.

Standard library only: the web process imports it (forms, JSON API, admin, pages) without
torch or TensorFlow, and the engine validates every technique's options against it
(`BaseOptimization.options`), so a name means the same thing everywhere.

An option has the same name in both frameworks; where it applies to one framework only, or its
default, range or choices differ, that is declared per framework. `as_dict()` is the one
serializable view; `GET /api/catalog` serves it and the pages build their forms from it:

    {"frameworks": [{"name", "label", "model_suffixes": [".pt2", ...]}],
     "dataset_suffixes": [".npz", ".zip"], "image_suffixes": [".png", ...],
     "techniques": [{"name", "label", "description", "cost", "post_training", "fine_tunes",
                     "reports": [result field names it fills],
                     "options": [{"name", "type": "int" | "float" | "bool" | "choice",
                                  "help", "nullable",
                                  "frameworks": {"pytorch": {"default", "min", "max", "choices"},
                                                 "tensorflow": {...}}}]}],
     "constraints": [{"name", "label", "unit", "help"}],
     "goals": [{"name", "label", "description"}],
     "devices": [{"name", "label", "cpu", "ram_mb"}],
     "plans": [{"name", "label", "description"}],
     "result_fields": [{"name", "type", "help"}],
     "limits": {"max_epochs": 100, "time_budget_s": {"min": 1, "max": 86400}}}

`as_dict(framework="pytorch")` gives the same with each option flattened to that framework
(`default`, `min`, `max`, `choices` at the option's top level) and options of the other
framework left out: what a form for one framework needs.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

FRAMEWORKS = ("pytorch", "tensorflow")
FRAMEWORK_LABELS = {"pytorch": "PyTorch", "tensorflow": "TensorFlow / Keras"}
BOTH = FRAMEWORKS

# Formats a framework loads, in the order a pretrained model is picked when several exist.
MODEL_SUFFIXES = {
    "pytorch": (".pt2", ".pt", ".pth", ".onnx", ".zip"),  # .zip: an .onnx with its external data
    "tensorflow": (".keras", ".h5", ".zip"),
}
DATASET_SUFFIXES = (".npz", ".zip")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")

MAX_EPOCHS = 100
MAX_TIME_BUDGET_S = 86400.0
PROFILES = Path(__file__).resolve().parent / "devices" / "profiles.json"


class OptionError(ValueError):
    """An option a technique does not take, or a value it cannot use; the message names what
    is allowed."""


@dataclass(frozen=True)
class Option:
    """One typed knob. `default`, `minimum`, `maximum` and `choices` are either one value for
    every framework or a {framework: value} mapping; `frameworks` lists where it applies."""

    name: str
    type: str  # "int" | "float" | "bool" | "choice"
    default: Any
    help: str
    minimum: Any = None
    maximum: Any = None
    choices: Any = None
    frameworks: tuple[str, ...] = BOTH
    nullable: bool = False  # None means "derived from other options" (the help says how)

    def for_framework(self, framework: str) -> dict:
        def pick(value):
            return value.get(framework) if isinstance(value, dict) else value

        choices = pick(self.choices)
        return {"default": pick(self.default), "min": pick(self.minimum), "max": pick(self.maximum),
                "choices": list(choices) if choices is not None else None}

    def check(self, framework: str, value: Any, technique: str) -> Any:
        """The value if this option can take it in `framework`, else OptionError."""
        spec = self.for_framework(framework)
        where = f"{technique}.{self.name}"
        if value is None:
            if self.nullable:
                return None
            raise OptionError(f"{where} needs a value ({self.help})")
        if self.type == "choice":
            if isinstance(value, bool) or value not in spec["choices"]:
                raise OptionError(f"{where} must be one of {', '.join(map(str, spec['choices']))} "
                                  f"for {framework}, not {value!r}")
            return value
        if self.type == "bool":
            if not isinstance(value, bool):
                raise OptionError(f"{where} must be true or false, not {value!r}")
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                (self.type == "int" and not (isinstance(value, int) or float(value).is_integer())):
            raise OptionError(f"{where} must be {'an integer' if self.type == 'int' else 'a number'}, "
                              f"not {value!r}")
        if not math.isfinite(value):
            raise OptionError(f"{where} must be a finite number, not {value!r}")
        value = int(value) if self.type == "int" else float(value)
        low, high = spec["min"], spec["max"]
        if (low is not None and value < low) or (high is not None and value > high):
            raise OptionError(f"{where} must be from {low:g} to {high:g}, not {value:g}")
        return value

    def as_dict(self, framework: str | None = None) -> dict:
        base = {"name": self.name, "type": self.type, "help": self.help, "nullable": self.nullable}
        if framework is not None:
            return {**base, **self.for_framework(framework)}
        return {**base, "frameworks": {fw: self.for_framework(fw) for fw in self.frameworks}}


@dataclass(frozen=True)
class AtBest:
    """The smallest size and latency (as fractions of the FP32 baseline's) a technique can
    reach with its options, and why in words; `same_graph_as` names a technique whose file it
    can at best equal (then its own result is the bound). Estimated device energy follows
    latency. Bounds are deliberately optimistic: the planner must never skip a winner."""

    size: float
    latency: float
    why: str
    same_graph_as: str | None = None


@dataclass(frozen=True)
class Technique:
    name: str
    label: str
    description: str
    cost: str  # the typical cost, in words, for the form
    post_training: bool
    reports: tuple[str, ...]  # result fields every framework's run fills
    options: tuple[Option, ...] = field(default_factory=tuple)
    # what the technique can at best achieve with these options (the planner's bound)
    at_best: Callable[[dict], AtBest] = field(default=lambda options: AtBest(1.0, 1.0, "no bound"))

    @property
    def fine_tunes(self) -> bool:
        return any(option.name == "epochs" for option in self.options)

    def options_for(self, framework: str) -> dict[str, Option]:
        return {option.name: option for option in self.options if framework in option.frameworks}

    def defaults(self, framework: str) -> dict:
        return {name: option.for_framework(framework)["default"]
                for name, option in self.options_for(framework).items()}

    def as_dict(self, framework: str | None = None) -> dict:
        options = self.options if framework is None else self.options_for(framework).values()
        return {"name": self.name, "label": self.label, "description": self.description,
                "cost": self.cost, "post_training": self.post_training,
                "fine_tunes": self.fine_tunes, "reports": list(self.reports),
                "options": [option.as_dict(framework) for option in options]}


# ------------------------------------------------------------------------- shared options

def only(option: Option, *frameworks: str) -> Option:
    """The same option, for these frameworks only."""
    return replace(option, frameworks=frameworks)


def _epochs(default, help_text="fine-tuning epochs over the training split"):
    return Option("epochs", "int", default, help_text, minimum=0, maximum=MAX_EPOCHS)


def _learning_rate(default, name="learning_rate", help_text="Adam learning rate of the fine-tuning"):
    return Option(name, "float", default, help_text, minimum=1e-7, maximum=1.0)


# Channel pruning keeps each layer's channel count a multiple of this: vector units hold 16
# floats (AVX-512) or 16 int8 lanes (NEON, AVX2), and onnxruntime's blocked-layout convolutions
# work in blocks of 8 or 16 channels. Off the block, kernels fall back to slower paths: on the
# AVX-512 dev machine MobileNetV2 with 55% of its channels removed, unrounded, ran slower than the
# unpruned model; rounded to 16 it ran 2.9x faster.
CHANNEL_MULTIPLE = 16

BATCH_SIZE = Option("batch_size", "int", 32, "training batch size", minimum=1, maximum=4096,
                    frameworks=("tensorflow",))
CHANNEL_MULTIPLE_OPTION = Option(
    "channel_multiple", "int", CHANNEL_MULTIPLE,
    "keep each layer's channel count a multiple of this (vector width), rounded up so no layer "
    "loses more than the ratio; 0 or 1: no rounding",
    minimum=0, maximum=256, frameworks=("pytorch",))
WEIGHT_GRANULARITY = Option(
    "weight_granularity", "choice", "auto",
    "INT8 weight scales: per output channel, per tensor (smaller file), or auto (per tensor when "
    "it agrees with FP32 as well as per channel)", choices=("auto", "per_channel", "per_tensor"))
AUTO_MAX_DROP_PTS = Option(
    "auto_max_drop_pts", "float", 0.5,
    "with auto granularity: per tensor only if it loses at most this many points on training "
    "samples", minimum=0.0, maximum=100.0, frameworks=("tensorflow",))
INT8_FORMAT = Option(
    "format", "choice", "qoperator",
    "ONNX INT8 form: qoperator (onnxruntime's QLinear operators, smaller) or qdq (portable)",
    choices=("qoperator", "qdq"), frameworks=("pytorch",))
TEMPERATURE = Option("temperature", "float", 4.0, "softening temperature of the teacher's outputs",
                     minimum=1.0, maximum=50.0)
ALPHA = Option("alpha", "float", 0.7, "weight of the teacher's soft targets against the labels",
               minimum=0.0, maximum=1.0)
DISTILL = Option("distill", "bool", True,
                 "fine-tune on the unpruned model's soft targets as well as the labels",
                 frameworks=("tensorflow",))
PRUNING_RATIO = "fraction of the channels of every prunable layer removed (ranked by weight magnitude)"

# ------------------------------------------------------------------------- techniques

def _narrowed(width: float, what: str, int8: bool = False) -> AtBest:
    """Keeping `width` of every layer's channels keeps at least width^2 of the weights and MACs
    (a layer loses inputs and outputs); INT8 divides both by 4 more."""
    share = width ** 2 / (4 if int8 else 1)
    return AtBest(share, share, f"{what} leaves at least {width ** 2:.0%} of the weights and MACs"
                  + (", each in 8 bits" if int8 else "") + f": at best {1 / share:.3g}x smaller and faster")


# Magnitude pruning's defaults by model size: a network's redundancy grows with its size, so
# a small one loses accuracy at a sparsity a large one shrugs off, and needs longer to recover.
# (below this many parameters, target sparsity, fine-tuning epochs). Measured in TensorFlow
# (tfmot, each prunable layer to the same sparsity, polynomial schedule, cosine rate 3e-4, 8
# epochs) on MobileNetV2 alpha 0.35 (402k params, 32x32 digits, 98.33%): at 50% it lost 1.67
# pts (0.28 and 1.67 over two seeds with its smallest layers kept dense; 1.39 in the old 3
# epochs); at 35% none (with the small layers dense: -0.28 and 0.00 over two seeds). The larger tiers follow gradual
# pruning's published results (Zhu & Gupta 2018: MobileNet, 4.2M, about 1 pt at 50%; larger
# networks at 75% and more), not a measurement here.
PRUNING_BY_SIZE = (
    (1_000_000, 0.35, 8),
    (10_000_000, 0.5, 5),
    (math.inf, 0.7, 3),
)


def pruning_by_size(params: int) -> dict:
    """{"target_sparsity", "epochs", "size"}: magnitude pruning's defaults for a model of
    `params` parameters (PRUNING_BY_SIZE), with its size tier in words."""
    above = 0
    for below, sparsity, epochs in PRUNING_BY_SIZE:
        if params < below:
            size = f"under {below / 1e6:g}M" if math.isfinite(below) else f"{above / 1e6:g}M or more"
            return {"target_sparsity": sparsity, "epochs": epochs, "size": size}
        above = below
    raise AssertionError("the last tier of PRUNING_BY_SIZE has no upper bound")


def with_pruning_by_size(options: dict, params: int) -> dict:
    """`options` with an empty target_sparsity / epochs filled in by pruning_by_size, and
    "size_choice": what was chosen and why (None when both were given)."""
    tier = pruning_by_size(params)
    chosen = {name: tier[name] for name in ("target_sparsity", "epochs") if options.get(name) is None}
    words = [f"{chosen['target_sparsity']:.0%} sparsity"] if "target_sparsity" in chosen else []
    words += [f"{chosen['epochs']} fine-tuning epochs"] if "epochs" in chosen else []
    return {**options, **chosen, "size_choice": {
        "params": int(params), **chosen,
        "reason": f"{int(params):,} parameters ({tier['size']}): {' and '.join(words)}; smaller "
                  "networks have fewer redundant weights, so they are pruned less and fine-tuned "
                  "longer"} if chosen else None}


TECHNIQUE_LIST = (
    Technique(
        "ptq_int8", "Post-training INT8",
        "Static INT8 quantization calibrated on sample inputs; no training.",
        "seconds", post_training=True,
        reports=("precision", "bits_per_layer", "float_layers", "calibration_samples"),
        at_best=lambda options: AtBest(1 / 4, 1 / 4, "32-bit weights become 8-bit: at best 4x smaller "
                                       "and 4x faster (INT8 kernels do 4x the work per cycle)"),
        options=(
            WEIGHT_GRANULARITY, INT8_FORMAT,
            Option("calibration_samples", "int", 200,
                   "calibration samples the activation ranges are measured on (at most the "
                   "calibration split)", minimum=1, maximum=100000, frameworks=("tensorflow",)),
            AUTO_MAX_DROP_PTS,
        )),
    Technique(
        "ptq_int4", "Post-training INT4",
        "4-bit weights with INT8 activations; the layers the model is most sensitive to stay 8-bit "
        "(measured on the calibration samples); no training.",
        "seconds to a minute (one calibration pass per layer while choosing the 8-bit ones)",
        post_training=True,
        reports=("precision", "bits_per_layer", "float_layers"),
        at_best=lambda options: AtBest(1 / 8, 1 / 4, "4-bit weights: at best 8x smaller; the kernels "
                                       "are INT8-class: at best 4x faster"),
        options=(
            Option("scheme", "choice", "w4a8",
                   "which layers get 4-bit weights: w4a8 (every layer 4-bit weights, int8 activations; "
                   "PyTorch: convolutions too, their 4-bit weights cast to int8 when the runtime loads "
                   "the file; TensorFlow: fully connected and pointwise layers), w4 (PyTorch: 4-bit "
                   "weights, float activations), fc4_conv8 (4-bit fully connected, 8-bit convolutions), "
                   "all4 (TensorFlow: every weight 4-bit: smallest, slower)",
                   choices={"pytorch": ("w4a8", "w4", "fc4_conv8"), "tensorflow": ("w4a8", "fc4_conv8", "all4")}),
            Option("block_size", "choice", 64, "weights sharing one 4-bit scale (w4 and MatMulNBits blocks)",
                   choices=(16, 32, 64, 128, 256), frameworks=("pytorch",)),
            Option("min_agreement", "float", 0.99, "top-1 agreement with the FP32 model on the calibration "
                   "samples below which the most sensitive layer goes back to 8 bits",
                   minimum=0.5, maximum=1.0, frameworks=("pytorch",)),
            Option("max_logit_error", "float", 0.05, "mean squared logit change (relative to the FP32 "
                   "logits' mean square) above which the most sensitive layer goes back to 8 bits",
                   minimum=0.0, maximum=1.0, frameworks=("pytorch",)),
            Option("accuracy_level", "choice", 4, "MatMulNBits compute precision (onnxruntime: 0 unset, "
                   "1 fp32, 2 fp16, 3 bf16, 4 int8)", choices=(0, 1, 2, 3, 4), frameworks=("pytorch",)),
            INT8_FORMAT, WEIGHT_GRANULARITY, AUTO_MAX_DROP_PTS,
        )),
    Technique(
        "prune_unstructured", "Magnitude pruning",
        "Zeroes the smallest weights and fine-tunes; the dense file keeps its size, the saving "
        "shows compressed.",
        "a few fine-tuning epochs", post_training=False,
        reports=("precision", "sparsity", "epochs", "compressed_size_bytes"),
        at_best=lambda options: AtBest(1.0, 1.0, "the dense file stores every zero: the same size "
                                       "and speed as the baseline (the saving shows only compressed)"),
        options=(
            Option("target_sparsity", "float", {"pytorch": 0.5, "tensorflow": None},
                   "fraction of the conv/dense weights set to zero (empty: chosen by the model's "
                   "parameter count, see pruning_by_size)",
                   minimum=0.01, maximum=0.99, nullable=True),
            Option("epochs", "int", {"pytorch": 2, "tensorflow": None},
                   "fine-tuning epochs over the training split (empty: chosen by the model's "
                   "parameter count, see pruning_by_size)",
                   minimum=0, maximum=MAX_EPOCHS, nullable=True),
            _learning_rate({"pytorch": 3e-4, "tensorflow": 3e-4}),
            BATCH_SIZE,
        )),
    Technique(
        "prune_structured", "Channel pruning",
        "Removes whole channels, so the model really has fewer weights and runs faster; "
        "fine-tuned afterwards.",
        "many fine-tuning epochs (recovery after a channel cut is close to retraining)",
        post_training=False,
        reports=("precision", "channels_kept", "epochs"),
        at_best=lambda options: _narrowed(1 - options["pruning_ratio"],
                                          f"removing {options['pruning_ratio']:.0%} of the channels"),
        options=(
            # PyTorch 0.6: channel counts round up to their multiple, so a layer keeps at least
            # 40%; at 0.5 MobileNetV2 w0.5 ran only 2.03-2.25x faster (2.5x when counts rounded
            # down, which cut narrow layers to a third and cost lcnet_035 ~32 pts)
            Option("pruning_ratio", "float", {"pytorch": 0.6, "tensorflow": 0.5}, PRUNING_RATIO,
                   minimum=0.05, maximum=0.95),
            # PyTorch: removing half the channels costs most of a network's accuracy at once
            # (MobileNetV2: 98.6% -> 9%); on MobileNetV2 w0.5 / digits 32x32 with cosine decay 5
            # epochs left a 5 pt drop, 10 epochs 2.8 pt, 20 epochs 0.3 pt. TensorFlow (alpha 0.35,
            # half the channels): 3 epochs on the labels alone left 8 pts, 10 on the labels 7, 10
            # distilled from the original 1.7 pts at 1e-3 and 1.1 at 3e-3; the demo recovers in 10.
            _epochs({"pytorch": 20, "tensorflow": 15}),
            _learning_rate({"pytorch": 1e-3, "tensorflow": 3e-3}),
            CHANNEL_MULTIPLE_OPTION, BATCH_SIZE, DISTILL,
            only(TEMPERATURE, "tensorflow"),
            only(ALPHA, "tensorflow"),
        )),
    Technique(
        "distillation", "Knowledge distillation",
        "Trains a narrower student on the original model's soft outputs; the same student is "
        "trained alone to show the gain.",
        "two trainings of the student", post_training=False,
        reports=("precision", "channels_kept", "epochs"),
        at_best=lambda options: _narrowed(options["student_width"],
                                          f"a student {options['student_width']:.0%} as wide"),
        options=(
            Option("student_width", "float", 0.5,
                   "fraction of the teacher's channels the student keeps in every prunable layer",
                   minimum=0.05, maximum=0.95),
            # a student cut from the teacher starts where channel pruning leaves it; from random
            # weights a few epochs leave a timm lcnet_035 near chance (+42 pts after 3 epochs)
            Option("student_init", "choice", "teacher",
                   "the student's starting weights: the teacher's own, on the channels it keeps "
                   "(largest magnitude), or random (a student trained from scratch)",
                   choices=("teacher", "random")),
            TEMPERATURE, ALPHA,
            _epochs({"pytorch": 6, "tensorflow": 10}),
            _learning_rate({"pytorch": 1e-3, "tensorflow": 2e-3}),
            CHANNEL_MULTIPLE_OPTION, BATCH_SIZE,
        )),
    Technique(
        "qat", "Quantization-aware training",
        "Fine-tunes with INT8 rounding simulated, then writes an INT8 file: the same INT8 graph "
        "as post-training INT8, with accuracy recovered by training.",
        "a few fine-tuning epochs at about 3x the cost of plain training", post_training=False,
        reports=("precision", "bits_per_layer", "float_layers", "epochs"),
        at_best=lambda options: AtBest(1 / 4, 1 / 4, "it writes the same INT8 graph as ptq_int8: at best "
                                       "as small and as fast; only accuracy can improve",
                                       same_graph_as="ptq_int8"),
        options=(
            _epochs({"pytorch": 1, "tensorflow": 2}),
            _learning_rate(1e-4),
            BATCH_SIZE,
            Option("weight_granularity", "choice", "per_tensor",
                   "INT8 weight scales: per tensor (as small as ptq_int8's per-tensor file; "
                   "fine-tuning recovers the accuracy) or per output channel",
                   choices=("per_tensor", "per_channel"), frameworks=("tensorflow",)),
        )),
    Technique(
        "hybrid", "Hybrid (prune + quantize)",
        "Channel pruning, optional magnitude pruning and fine-tuning, then INT8: the smallest "
        "file at a bounded accuracy drop.",
        "the longest: a channel cut's fine-tuning plus quantization", post_training=False,
        reports=("precision", "bits_per_layer", "float_layers", "channels_kept", "sparsity",
                 "epochs", "compressed_size_bytes"),
        at_best=lambda options: _narrowed(
            1 - options["pruning_ratio"] if options.get("structured_first", True) else 1.0,
            f"removing {options['pruning_ratio']:.0%} of the channels, then 8-bit weights"
            if options.get("structured_first", True) else "8-bit weights", int8=True),
        options=(
            # PyTorch 0.6: channel counts round up to the multiple, so narrow layers keep more than
            # the ratio says; on MobileNetV2 w0.5 (digits 32x32, 20 epochs) 0.5 made a 9.67x file,
            # 0.6 12.51x at the same +0.28 pt and 2.58x faster
            Option("pruning_ratio", "float", {"pytorch": 0.6, "tensorflow": 0.75}, PRUNING_RATIO,
                   minimum=0.05, maximum=0.95),
            Option("target_sparsity", "float", {"pytorch": 0.0, "tensorflow": 0.5},
                   "fraction of the remaining weights set to zero after the channel cut "
                   "(PyTorch: 0 skips this step)",
                   minimum={"pytorch": 0.0, "tensorflow": 0.01}, maximum=0.99),
            _epochs({"pytorch": 20, "tensorflow": 10},
                    "fine-tuning epochs (TensorFlow: of the magnitude-pruning stage; the others "
                    "scale with it unless given)"),
            _learning_rate(1e-3),
            CHANNEL_MULTIPLE_OPTION, INT8_FORMAT,
            only(WEIGHT_GRANULARITY, "pytorch"),
            Option("structured_first", "bool", True, "remove channels before the magnitude pruning",
                   frameworks=("tensorflow",)),
            Option("structured_epochs", "int", None,
                   "fine-tuning epochs after the channel cut (empty: 3x epochs)",
                   minimum=0, maximum=MAX_EPOCHS, frameworks=("tensorflow",), nullable=True),
            only(_learning_rate(3e-3, "structured_learning_rate", "learning rate after the channel cut"),
                 "tensorflow"),
            DISTILL,
            only(TEMPERATURE, "tensorflow"),
            only(ALPHA, "tensorflow"),
            Option("qat_epochs", "int", None,
                   "epochs of pruning-preserving quantization-aware training (empty: half of epochs)",
                   minimum=0, maximum=MAX_EPOCHS, frameworks=("tensorflow",), nullable=True),
            Option("qat_learning_rate", "float", 1e-4, "learning rate of the quantization-aware stage",
                   minimum=1e-7, maximum=1.0, frameworks=("tensorflow",)),
            BATCH_SIZE,
        )),
)
TECHNIQUE_SPECS = {technique.name: technique for technique in TECHNIQUE_LIST}
TECHNIQUES = tuple(TECHNIQUE_SPECS)
FINE_TUNING_TECHNIQUES = tuple(t.name for t in TECHNIQUE_LIST if t.fine_tunes)


def technique_spec(name: str) -> Technique:
    if name not in TECHNIQUE_SPECS:
        raise OptionError(f"unknown technique {name!r}; the techniques are {', '.join(TECHNIQUES)}")
    return TECHNIQUE_SPECS[name]


def validate_options(technique: str, framework: str, options: dict | None) -> dict:
    """The technique's defaults for `framework` with `options` on top, every value checked.
    OptionError names an unknown key with the allowed ones, or says what a value must be."""
    spec = technique_spec(technique)
    allowed = spec.options_for(framework)
    options = options or {}
    if not isinstance(options, dict):
        raise OptionError(f"the options of {technique} must be an object, e.g. {{\"epochs\": 2}}")
    if unknown := sorted(set(options) - set(allowed)):
        raise OptionError(f"{technique} has no option {', '.join(unknown)} for {framework}; "
                          f"its options are {', '.join(allowed) or 'none'}")
    merged = spec.defaults(framework)
    for name, value in options.items():
        merged[name] = allowed[name].check(framework, value, technique)
    return merged


def validate_all_options(framework: str, options_by_technique: dict | None) -> dict:
    """{technique: its checked overrides} (not merged with defaults, so stored configs stay
    small); OptionError on an unknown technique, option or value."""
    if not isinstance(options_by_technique or {}, dict):
        raise OptionError('options must map a technique to its options, e.g. {"qat": {"epochs": 2}}')
    cleaned = {}
    for technique, options in (options_by_technique or {}).items():
        checked = validate_options(technique, framework, options)
        cleaned[technique] = {name: checked[name] for name in options}
    return cleaned


# ------------------------------------------------------------------------- constraints, goals


@dataclass(frozen=True)
class Constraint:
    name: str
    label: str
    unit: str
    help: str


CONSTRAINT_LIST = (
    Constraint("max_accuracy_drop", "accuracy drop", "points",
               "largest accepted accuracy loss against the original model, in percentage points"),
    Constraint("max_size_mb", "size", "MB", "largest accepted file to download (1 MB = 2^20 bytes)"),
    Constraint("max_latency_ms", "estimated latency", "ms", "largest estimated latency on the target device"),
    Constraint("max_memory_mb", "estimated peak memory", "MB", "largest estimated peak memory on the target device"),
    Constraint("max_energy_mj", "estimated energy per inference", "mJ",
               "largest estimated energy per inference on the target device"),
)
CONSTRAINTS = {constraint.name: constraint for constraint in CONSTRAINT_LIST}
CONSTRAINT_NAMES = tuple(CONSTRAINTS)


@dataclass(frozen=True)
class Goal:
    name: str
    label: str
    description: str  # completes "Goal: ..."


GOAL_LIST = (
    Goal("balanced", "Balanced", "the best balance of size, latency and accuracy"),
    Goal("min_size", "Smallest model", "the smallest file"),
    Goal("min_latency", "Fastest", "the lowest estimated latency on the target"),
    Goal("max_accuracy", "Most accurate", "the highest accuracy"),
    Goal("min_energy", "Least energy", "the least estimated energy per inference on the target"),
)
GOALS = {goal.name: goal for goal in GOAL_LIST}
GOAL_NAMES = tuple(GOALS)
DEFAULT_GOAL = "balanced"

PLANS = {
    "all": ("Run every technique", "every selected technique runs, in the order given"),
    "budget": ("Skip what cannot win",
               "cheapest first; a technique that cannot beat the best result so far on the goal "
               "within the constraints, or whose estimate does not fit the time budget, is "
               "skipped with the reason"),
}
PLAN_NAMES = tuple(PLANS)
API_DEFAULT_PLAN, PAGE_DEFAULT_PLAN = "all", "budget"


# ------------------------------------------------------------------------- devices


def _load_devices() -> dict[str, dict]:
    profiles = json.loads(PROFILES.read_text())["devices"]
    return {name: {"name": name, "label": profile["name"], "cpu": profile.get("cpu"),
                   "ram_mb": profile.get("ram_mb")} for name, profile in profiles.items()}


DEVICES = _load_devices()
DEVICE_NAMES = tuple(DEVICES)


# ------------------------------------------------------------------------- results

# The vocabulary every technique reports in the same words (OptimizedResult's typed fields);
# a run's details keep each technique's extras beside them.
RESULT_FIELDS = {
    "precision": ("str", "number format of the weights in the deploy file: fp32, int8 or int4"),
    "bits_per_layer": ("dict", "weight bits of each weighted layer of the deploy file, by layer name"),
    "float_layers": ("list", "weighted layers left in 32-bit float in a quantized file"),
    "sparsity": ("float", "fraction of the conv/dense weights that are zero"),
    "channels_kept": ("float", "fraction of the channels kept in the layers whose channels shrank"),
    "epochs": ("int", "fine-tuning epochs run (all stages)"),
    "calibration_samples": ("int", "samples the activation ranges were calibrated on"),
    "compressed_size_bytes": ("int", "bytes of the deploy file after gzip -9 (where zeros pay off)"),
}
RESULT_TYPES = {"str": str, "dict": dict, "list": list, "float": (int, float), "int": int}


def check_result_field(name: str, value) -> None:
    """TypeError for a result field that is not in the vocabulary or has the wrong type."""
    if name not in RESULT_FIELDS:
        raise TypeError(f"{name!r} is not a result field; the fields are {', '.join(RESULT_FIELDS)}")
    expected = RESULT_TYPES[RESULT_FIELDS[name][0]]
    if value is not None and (isinstance(value, bool) or not isinstance(value, expected)):
        raise TypeError(f"result field {name} must be {RESULT_FIELDS[name][0]}, not {type(value).__name__}")


# ------------------------------------------------------------------------- the serializable view


def as_dict(framework: str | None = None) -> dict:
    """Everything above as JSON-ready data (shape in the module docstring); with a framework,
    options flattened to it."""
    if framework is not None and framework not in FRAMEWORKS:
        raise OptionError(f"unknown framework {framework!r}; use {' or '.join(FRAMEWORKS)}")
    frameworks = FRAMEWORKS if framework is None else (framework,)
    return {
        "frameworks": [{"name": fw, "label": FRAMEWORK_LABELS[fw], "model_suffixes": list(MODEL_SUFFIXES[fw])}
                       for fw in frameworks],
        "dataset_suffixes": list(DATASET_SUFFIXES),
        "image_suffixes": list(IMAGE_SUFFIXES),
        "techniques": [technique.as_dict(framework) for technique in TECHNIQUE_LIST],
        "constraints": [{"name": c.name, "label": c.label, "unit": c.unit, "help": c.help}
                        for c in CONSTRAINT_LIST],
        "goals": [{"name": g.name, "label": g.label, "description": g.description} for g in GOAL_LIST],
        "default_goal": DEFAULT_GOAL,
        "devices": list(DEVICES.values()),
        "plans": [{"name": name, "label": label, "description": text} for name, (label, text) in PLANS.items()],
        "default_plan": {"api": API_DEFAULT_PLAN, "page": PAGE_DEFAULT_PLAN},
        "result_fields": [{"name": name, "type": kind, "help": text} for name, (kind, text) in RESULT_FIELDS.items()],
        "limits": {"max_epochs": MAX_EPOCHS, "time_budget_s": {"min": 1, "max": MAX_TIME_BUDGET_S}},
    }
