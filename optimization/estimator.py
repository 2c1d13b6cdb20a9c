"""PerformanceEstimator: latency, peak memory and energy of a deploy file on an edge board.

The model, per fused kernel of the op graph (optimization.graph):

    compute = (MACs + output_cost * output elements)
              / (cores_eff(threads) * clock * peak MACs/cycle[precision] * efficiency)
    memory  = (input + output activation bytes + weight bytes) / (bandwidth * bandwidth_fraction)
    latency = sum over kernels of softmax_p(compute, memory) + kernels * per-op overhead

    efficiency = exp(runtime_fp32[runtime] + kind[kernel class] + uarch[core]
                     (+ int8_shared + int8_gain[runtime] + int8_kind[kernel class]
                        + int8_runtime_kind[runtime, kernel class] for int8/int4 kernels)
                     (+ isa_armv7[fp32 or int8] for a 32-bit ARMv7 build))

A 32-bit (ARMv7) build of the same runtime on the same core has 16 instead of 32 128-bit NEON
registers, so smaller GEMM register tiles, and other hand-written kernels; the published
32-bit/64-bit pairs (XNNPACK's RPi 4 columns, Q-engineering's two TensorFlow Lite apps) differ
mostly for int8, hence one term per precision. The estimator itself predicts 64-bit builds
(the Raspberry Pi OS default); the terms only keep 32-bit calibration points from biasing the
fit. A runtime that computes float models in half precision on cores with ARMv8.2 FP16
arithmetic (ncnn does by default) uses the core's fp16 peak and two-byte activations for its
float kernels.

The INT8 gain differs by kernel class because the kernels differ: a 1x1 or 3x3 convolution
is a deep GEMM whose int8 inner loop does twice the fp32 MACs per instruction, a depthwise
convolution is a shallow per-channel reduction whose int8 version spends much of its time
widening and requantizing. A 1x1 convolution (a plain GEMM) is the reference class of both `kind` and
`int8_kind`; the runtime-by-class terms have a tight prior around zero, so a runtime with
little int8 data keeps the shared per-class gain.
    cores_eff(threads) = 1 + (threads - 1) * thread_scaling[fp32 or int8]
    int8 elementwise kernels also pay int8_elementwise_cycles per output element (requantizing)
    softmax_p(a, b) = (a^p + b^p)^(1/p), p = roofline_sharpness (p -> infinity is the max)

Peak MACs/cycle, clock, cores and bandwidth come from `devices/profiles.json`; the
efficiencies, thread scaling, overhead and bandwidth fraction are fitted by
`bench/estimator_validation.py` to the published measurements in `devices/calibration.json`
and read from `devices/fitted.json`. The latency interval is the fitted value times
exp(+-h), h being the 80th percentile of the leave-one-source-out log error.

Peak memory = weights at storage width + peak live activations (a liveness pass over the op
list, i.e. a perfect arena) + the runtime's documented overhead. Energy = latency * board
power, the power interpolated between idle and all-cores-active by the threads used.
"""
from __future__ import annotations

import json
import math
from functools import lru_cache
from pathlib import Path

import numpy as np

from optimization.graph import (PRECISION_BITS, WEIGHTED_CLASSES, Graph, load_model_graph,
                                peak_activation_bytes)

DEVICES_DIR = Path(__file__).resolve().parent / "devices"
RUNTIMES = ("tflite", "onnxruntime")
PRECISIONS = ("fp32", "int8", "int4")
FIT_RUNTIMES = ("tflite", "onnxruntime", "ncnn", "pytorch")
FITTED_KINDS = ("conv", "conv_winograd", "depthwise", "fc")  # conv1x1 (a plain GEMM) is the reference
INT8_KINDS = ("conv", "depthwise", "fc")  # int8 gain relative to conv1x1
UNCALIBRATED_WIDENING = 1.5  # interval widening where no measurement backs runtime or core
POWER_UNCERTAINTY = 0.15  # relative, on the board power figures


class UnknownDeviceError(ValueError):
    pass


def parameter_names() -> list[str]:
    profiles = load_profiles()["devices"].values()
    uarchs = sorted({p["microarchitecture"] for p in profiles} - {"cortex-a72"})
    return ([f"runtime_fp32:{r}" for r in FIT_RUNTIMES] + ["int8_shared"]
            + [f"int8_gain:{r}" for r in FIT_RUNTIMES] + [f"int8_kind:{k}" for k in INT8_KINDS]
            + [f"int8_runtime_kind:{r}:{k}" for r in FIT_RUNTIMES for k in INT8_KINDS]
            + [f"kind:{k}" for k in FITTED_KINDS]
            + [f"uarch:{u}" for u in uarchs]
            + ["isa_armv7:fp32", "isa_armv7:int8"]
            + ["thread_scaling_logit", "int8_thread_scaling", "log_op_overhead_s", "log_bandwidth_fraction",
               "log_output_cost_macs", "log_int8_elementwise_cycles", "log_roofline_sharpness"])


@lru_cache(maxsize=None)
def load_profiles() -> dict:
    return json.loads((DEVICES_DIR / "profiles.json").read_text())


@lru_cache(maxsize=None)
def load_calibration() -> dict:
    return json.loads((DEVICES_DIR / "calibration.json").read_text())


@lru_cache(maxsize=None)
def load_fitted() -> dict:
    path = DEVICES_DIR / "fitted.json"
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing: run `python bench/estimator_validation.py` to fit the estimator")
    return json.loads(path.read_text())


def device_profile(device: str) -> dict:
    devices = load_profiles()["devices"]
    if device not in devices:
        raise UnknownDeviceError(f"unknown device {device!r}; known devices: {', '.join(sorted(devices))}")
    return devices[device]


def costed_sizes(graph: Graph, precision: str | None) -> tuple[dict[str, int], list[int]]:
    """(bytes per activation tensor, weight bytes per op) as stored by the file, or, for a
    requested precision, with weighted kernels' weights at that storage width and (for
    int8/int4) activations at one byte per element."""
    if precision is None:
        return graph.tensor_bytes, [op.weight_bytes for op in graph.ops]
    width = 1 if precision in ("int8", "int4") else 4
    activations = {name: count * width for name, count in graph.tensor_elements.items()}
    weights = [math.ceil(op.params * PRECISION_BITS[precision if op.kind in WEIGHTED_CLASSES else "fp32"] / 8)
               for op in graph.ops]
    return activations, weights


def op_table(graph: Graph, precision: str | None = None) -> dict:
    """Per-kernel arrays the latency model needs. `precision` None keeps each op's own
    precision; otherwise every weighted kernel is costed at that precision (costed_sizes)."""
    activations, weights = costed_sizes(graph, precision)
    ops = graph.ops
    kinds = np.array([op.kind for op in ops], dtype=object)
    integer_costing = "int8" if precision in ("int8", "int4") else "fp32"
    precisions = [op.precision if precision is None else precision if op.kind in WEIGHTED_CLASSES else integer_costing
                  for op in ops]
    return {
        "kind": kinds,
        "winograd": np.array([op.winograd_eligible for op in ops], dtype=bool),
        "macs": np.array([op.macs for op in ops], dtype=float),
        "bytes": np.array([sum(activations.get(n, 0) for n in op.inputs + op.outputs) + w
                           for op, w in zip(ops, weights)], dtype=float),
        "outputs": np.array([sum(graph.tensor_elements.get(n, 0) for n in op.outputs) for op in ops], dtype=float),
        "integer": np.array([p in ("int8", "int4") for p in precisions], dtype=bool),
        "weighted": np.array([k in WEIGHTED_CLASSES for k in kinds], dtype=bool),
        "elementwise": kinds == "elementwise",
    }


def predict_latency_s(table: dict, profile: dict, runtime: str, threads: int, parameters: dict,
                      clock_ghz: float | None = None, isa: str = "aarch64") -> float:
    """Latency in seconds of one inference (the model in the module docstring); `isa` is
    "armv7" for a 32-bit build of the runtime."""
    clock = (clock_ghz or profile["clock_ghz"]) * 1e9
    used = max(1, min(int(threads), int(profile["cores"])))
    def cores_eff(logit):
        return 1.0 + (used - 1) / (1.0 + math.exp(-logit))

    # fp32 kernels move four times the bytes of int8 ones through the shared L2 and DRAM, so
    # the two precisions get their own scaling over cores
    cores = np.where(table["integer"], cores_eff(parameters["thread_scaling_logit"] + parameters["int8_thread_scaling"]),
                     cores_eff(parameters["thread_scaling_logit"]))
    base = parameters[f"runtime_fp32:{runtime}"] + parameters.get(f"uarch:{profile['microarchitecture']}", 0.0)
    int8 = parameters["int8_shared"] + parameters[f"int8_gain:{runtime}"] + np.array(
        [parameters.get(f"int8_kind:{k}", 0.0) + parameters.get(f"int8_runtime_kind:{runtime}:{k}", 0.0)
         for k in table["kind"]])
    kind_log = np.array([parameters.get(f"kind:{k}", 0.0) for k in table["kind"]])
    if load_profiles()["runtimes"][runtime].get("winograd_3x3"):
        kind_log = np.where(table["winograd"], parameters["kind:conv_winograd"], kind_log)
    if isa == "armv7":
        base = base + np.where(table["integer"], parameters["isa_armv7:int8"], parameters["isa_armv7:fp32"])
    efficiency = np.exp(base + kind_log + np.where(table["integer"], int8, 0.0))
    per_cycle = profile["macs_per_cycle_per_core"]
    runtime_info = load_profiles()["runtimes"][runtime]
    int8_per_cycle = per_cycle.get("int8_dotprod", per_cycle["int8"]) if runtime_info["uses_dotprod"] else per_cycle["int8"]
    half_precision = bool(runtime_info.get("fp16_arithmetic")) and "fp16" in per_cycle
    float_per_cycle = per_cycle["fp16"] if half_precision else per_cycle["fp32"]
    peak = np.where(table["integer"], int8_per_cycle, float_per_cycle) * clock * cores
    # each output element also costs a fixed amount of work (accumulator setup, requantize,
    # store): shallow reductions (depthwise, narrow 1x1) run far below peak because of it
    work = table["macs"] + math.exp(parameters["log_output_cost_macs"]) * table["outputs"]
    compute = np.where(table["weighted"], work / (peak * efficiency), 0.0)
    # an integer add or multiply rescales both inputs to the output's quantization: a few
    # cycles per element that a float elementwise op, bound by memory, does not pay
    requantize = table["elementwise"] & table["integer"]
    compute = compute + np.where(requantize, math.exp(parameters["log_int8_elementwise_cycles"]) * table["outputs"]
                                 / (clock * cores), 0.0)
    bandwidth = profile["memory_bandwidth_gbps"] * 1e9 * math.exp(parameters["log_bandwidth_fraction"])
    memory = np.where(half_precision & ~table["integer"], 0.5, 1.0) * table["bytes"] / bandwidth
    overhead = math.exp(parameters["log_op_overhead_s"])
    # a soft maximum: a kernel near the ridge point neither fully overlaps its loads with its
    # arithmetic nor fully serialises them
    sharpness = math.exp(parameters["log_roofline_sharpness"])
    both = (compute ** sharpness + memory ** sharpness) ** (1.0 / sharpness)
    return float(both.sum() + overhead * len(table["macs"]))


def estimate(path_or_graph, device: str, runtime: str | None = None, precision: str | None = None,
             threads: int = 4) -> dict:
    """Estimated latency / peak memory / energy of one batch-1 inference on `device`.

    `runtime` defaults to the file's own (tflite for .tflite, onnxruntime for .onnx) and
    `precision` to what the file contains (the precision carrying most MACs)."""
    graph = path_or_graph if isinstance(path_or_graph, Graph) else load_model_graph(path_or_graph)
    profile = device_profile(device)
    runtime = runtime or graph.runtime
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}; use one of {', '.join(RUNTIMES)}")
    if precision is not None and precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    if int(threads) < 1:
        raise ValueError("threads must be at least 1")
    file_precision = graph.precision
    precision = precision or file_precision
    fitted = load_fitted()
    parameters = fitted["parameters"]
    costed_precision = None if precision == file_precision else precision
    table = op_table(graph, costed_precision)
    latency_s = predict_latency_s(table, profile, runtime, threads, parameters)

    calibrated = fitted.get("calibrated", {})
    halfwidth = fitted["interval_log_halfwidth"]
    assumptions = [
        f"latency = sum over {len(graph.ops)} fused kernels of a soft max(compute, memory) + per-op overhead; "
        f"efficiencies fitted to {fitted['points_used']} published Raspberry Pi measurements "
        "(devices/calibration.json)",
        f"{profile['name']}: {profile['cores']} x {profile['cpu'].split('x ')[-1]} at {profile['clock_ghz']} GHz, "
        f"{'with' if profile['dotprod'] else 'without'} int8 dot product, "
        f"{profile['memory_bandwidth_gbps']} GB/s peak memory bandwidth",
        f"threads used: {min(int(threads), profile['cores'])} of {profile['cores']} cores, batch 1, no other load, "
        "no thermal throttling",
    ]
    if runtime not in calibrated.get("runtimes", []):
        halfwidth *= UNCALIBRATED_WIDENING
        assumptions.append(
            f"no published Raspberry Pi measurement of {runtime} is in the calibration set: its efficiency is "
            f"tied to TensorFlow Lite's (both run NEON GEMM kernels) and the interval is widened")
    if profile["microarchitecture"] not in calibrated.get("microarchitectures", []):
        halfwidth *= UNCALIBRATED_WIDENING
        assumptions.append(
            f"no calibration point on a {profile['microarchitecture']} core: its efficiency is assumed equal to "
            "the Cortex-A72's and the interval is widened")
    runtime_info = load_profiles()["runtimes"][runtime]
    if precision in ("int8", "int4") and profile["dotprod"] and runtime_info["uses_dotprod"]:
        assumptions.append(
            f"int8 on {profile['microarchitecture']} uses the dot-product (SDOT) peak, 4x fp32; the fraction of it "
            f"reached is the fitted one, as no published {runtime} int8 measurement on this core is in the "
            "calibration set")
    if precision in ("int8", "int4"):
        per_cycle = profile["macs_per_cycle_per_core"]
        int8_peak = per_cycle.get("int8_dotprod", per_cycle["int8"]) if runtime_info["uses_dotprod"] else per_cycle["int8"]
        int8_base = parameters["int8_shared"] + parameters[f"int8_gain:{runtime}"]
        speedups = {label: int8_peak / per_cycle["fp32"] * math.exp(
            int8_base + parameters.get(f"int8_kind:{kind}", 0.0) + parameters.get(f"int8_runtime_kind:{runtime}:{kind}", 0.0))
            for kind, label in (("conv", "3x3 conv"), ("depthwise", "depthwise"), ("conv1x1", "1x1 conv"),
                                ("fc", "fully connected"))}
        assumptions.append(
            f"int8 speed-up of a compute-bound kernel over fp32 on {runtime}, fitted per kernel class: "
            + ", ".join(f"{label} {gain:.2f}x" for label, gain in speedups.items())
            + "; memory-bound kernels gain from the 4x smaller activations instead, and int8 elementwise kernels "
            "pay a fitted requantization cost per element")
    if precision == "int4":
        assumptions.append("int4: weights stored at 4 bits, unpacked to int8 for compute (no int4 MAC kernels on "
                           "these CPUs); no published Pi int4 measurement exists, so its speed is the int8 fit")
    if costed_precision:
        assumptions.append(f"the file is {file_precision}; costed as if its weighted kernels ran at {precision}")
    assumptions.append(f"latency range = estimate x/ {math.exp(halfwidth):.2f}, from the 80th percentile of the "
                       "leave-one-source-out error of the fit (bench/estimator_validation.py)")

    activation_sizes, op_weights = costed_sizes(graph, costed_precision)
    weight_bytes = sum(op_weights)
    activations = peak_activation_bytes(graph, activation_sizes)
    overhead_mb = runtime_info["overhead_mb"]
    memory_mb = (weight_bytes + activations) / 2**20 + overhead_mb
    memory_high_mb = (2 * weight_bytes + 1.5 * activations) / 2**20 + 1.5 * overhead_mb
    assumptions.append(
        f"memory = weights at storage width ({weight_bytes / 2**20:.2f} MB) + peak live activations "
        f"({activations / 2**20:.2f} MB, perfect arena reuse) + {overhead_mb} MB {runtime} overhead "
        f"({runtime_info['overhead_source']}); high bound: repacked weight copies kept and 50% arena waste")

    used = min(int(threads), profile["cores"])
    power_w = profile["idle_power_w"] + (profile["active_power_w"] - profile["idle_power_w"]) * used / profile["cores"]
    assumptions.append(f"energy = latency x board power {power_w:.2f} W (idle {profile['idle_power_w']} W + "
                       f"{used}/{profile['cores']} of the all-core load increment), +-{POWER_UNCERTAINTY:.0%}")
    latency_ms = latency_s * 1e3
    low_ms, high_ms = latency_ms * math.exp(-halfwidth), latency_ms * math.exp(halfwidth)
    return {
        "device": device,
        "runtime": runtime,
        "precision": precision,
        "threads": int(threads),
        "latency_ms": round(latency_ms, 3),
        "latency_low_ms": round(low_ms, 3),
        "latency_high_ms": round(high_ms, 3),
        "memory_mb": round(memory_mb, 3),
        "memory_low_mb": round(memory_mb, 3),
        "memory_high_mb": round(memory_high_mb, 3),
        "energy_mj": round(latency_ms * power_w, 3),
        "energy_low_mj": round(low_ms * power_w * (1 - POWER_UNCERTAINTY), 3),
        "energy_high_mj": round(high_ms * power_w * (1 + POWER_UNCERTAINTY), 3),
        "macs": graph.macs,
        "params": graph.params,
        "assumptions": assumptions,
        "estimated": True,
    }
