"""One evaluator for the baseline and every technique, so the numbers compare.

It measures the deploy artifact (ONNX in onnxruntime, .tflite in LiteRT) — the file the
user downloads — never the eager framework model.
"""
from __future__ import annotations

import gzip
import math
import statistics
import time
from pathlib import Path
from typing import Callable

import numpy as np

from optimization.base import Backend
from optimization.datasets import Dataset

EVAL_BATCH = 256
# batch-1 latency: warm-up runs, then blocks of timed runs; a block's median is its figure
LATENCY_WARMUP_RUNS = 10
LATENCY_BLOCKS = 5
LATENCY_RUNS_PER_BLOCK = 60
# each block lasts at least this long, so the five spread over half a second even for a
# model of microseconds: five blocks of 60 runs of the 8x8 demo took 20 ms in all, and one
# slow spell right after training measured its baseline 3x slow
LATENCY_BLOCK_MIN_S = 0.1
LATENCY_BUDGET_S = 2.5


def correct_predictions(backend: Backend, deploy_path: Path, x: np.ndarray, y: np.ndarray) -> int:
    correct = 0
    for start in range(0, len(x), EVAL_BATCH):
        logits = backend.predict(deploy_path, x[start : start + EVAL_BATCH])
        correct += int((np.asarray(logits).argmax(axis=1) == y[start : start + EVAL_BATCH]).sum())
    return correct


def accuracy(backend: Backend, deploy_path: Path, x: np.ndarray, y: np.ndarray) -> float:
    return correct_predictions(backend, deploy_path, x, y) / len(x)


def _time_block(invoke: Callable[[], object], budget_s: float) -> float:
    """The median milliseconds of one block of calls: at least LATENCY_RUNS_PER_BLOCK calls
    lasting LATENCY_BLOCK_MIN_S, unless `budget_s` runs out first (and at least 3 calls)."""
    timings = []
    began = time.perf_counter()
    while True:
        start = time.perf_counter()
        invoke()
        timings.append((time.perf_counter() - start) * 1000)
        elapsed = time.perf_counter() - began
        if len(timings) >= 3 and (elapsed >= budget_s or (
                len(timings) >= LATENCY_RUNS_PER_BLOCK and elapsed >= LATENCY_BLOCK_MIN_S)):
            return statistics.median(timings)


def interleaved_block_medians(*invokes: Callable[[], object]) -> list[list[float]]:
    """Block medians (ms) of each `invoke`, timed in alternating blocks (block 1 of each, then
    block 2 of each, ...) after LATENCY_WARMUP_RUNS warm-up calls each, so a spell of load from
    other processes falls on all of them alike instead of on whichever ran during it. Each
    invoke gets LATENCY_BUDGET_S in all."""
    for invoke in invokes:
        for _ in range(LATENCY_WARMUP_RUNS):
            invoke()
    medians: list[list[float]] = [[] for _ in invokes]
    for _ in range(LATENCY_BLOCKS):
        for index, invoke in enumerate(invokes):
            medians[index].append(_time_block(invoke, LATENCY_BUDGET_S / LATENCY_BLOCKS))
    return medians


def steady_latency_ms(invoke: Callable[[], object]) -> float:
    """Milliseconds one `invoke()` takes: the lowest of LATENCY_BLOCKS block medians, so a
    burst of load from other processes during one block does not decide the number. Both
    runtimes are timed by this one rule, so their numbers compare."""
    return min(interleaved_block_medians(invoke)[0])


def latency_spread(block_medians: list[float]) -> dict:
    """latency_ms (the lowest block median, as steady_latency_ms) and its spread over the blocks."""
    return {"latency_ms": min(block_medians), "latency_ms_low": min(block_medians),
            "latency_ms_high": max(block_medians)}


def paired_latency(candidate: Callable[[], object], baseline: Callable[[], object]) -> dict:
    """The candidate's latency and its speedup over the baseline, timed in alternating blocks
    in this process: the speedup is the median of the per-block ratios, low/high their range.
    `speedup_within_noise` says the range includes 1 (no difference this host can show)."""
    candidate_blocks, baseline_blocks = interleaved_block_medians(candidate, baseline)
    ratios = sorted(b / c for b, c in zip(baseline_blocks, candidate_blocks) if c > 0)
    result = latency_spread(candidate_blocks)
    if ratios:
        result.update(speedup=round(statistics.median(ratios), 3), speedup_low=round(ratios[0], 3),
                      speedup_high=round(ratios[-1], 3),
                      speedup_within_noise=ratios[0] <= 1.0 <= ratios[-1])
    return result


def wilson_interval(correct: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a proportion: honest at 100% and on a few hundred samples,
    where the normal approximation gives [1, 1]."""
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def compressed_size(path: Path) -> int:
    """Bytes of the file after gzip -9: where unstructured sparsity shows, since a dense
    file stores every zero."""
    return len(gzip.compress(Path(path).read_bytes(), compresslevel=9))


def evaluate(backend: Backend, deploy_path: Path, dataset: Dataset, baseline_deploy: Path | None = None) -> dict:
    """Accuracy on the held-out test split (with n and a 95% interval), the deploy file's size,
    and batch-1 latency with its spread over the timing blocks. Given `baseline_deploy`, the
    latency is timed in alternating blocks with the baseline's and the result carries the
    paired speedup (see paired_latency)."""
    deploy_path = Path(deploy_path)
    n = len(dataset.x_test)
    correct = correct_predictions(backend, deploy_path, dataset.x_test, dataset.y_test)
    low, high = wilson_interval(correct, n)
    sample = dataset.x_test[:1]
    invoke = backend.latency_invoker(deploy_path, sample)
    if baseline_deploy is None:
        timing = latency_spread(interleaved_block_medians(invoke)[0])
    else:
        timing = paired_latency(invoke, backend.latency_invoker(Path(baseline_deploy), sample))
    return {
        "accuracy": correct / n,
        "accuracy_n": n,
        "accuracy_low": round(low, 5),
        "accuracy_high": round(high, 5),
        "size_bytes": deploy_path.stat().st_size,
        **timing,
    }
