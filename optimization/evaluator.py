"""One evaluator for the baseline and every technique, so the numbers compare.

It measures the deploy artifact (ONNX in onnxruntime, .tflite in LiteRT) — the file the
user downloads — never the eager framework model.
"""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from optimization.base import Backend
from optimization.datasets import Dataset

EVAL_BATCH = 256


def accuracy(backend: Backend, deploy_path: Path, x: np.ndarray, y: np.ndarray) -> float:
    correct = 0
    for start in range(0, len(x), EVAL_BATCH):
        logits = backend.predict(deploy_path, x[start : start + EVAL_BATCH])
        correct += int((np.asarray(logits).argmax(axis=1) == y[start : start + EVAL_BATCH]).sum())
    return correct / len(x)


def compressed_size(path: Path) -> int:
    """Bytes of the file after gzip -9: where unstructured sparsity shows, since a dense
    file stores every zero."""
    return len(gzip.compress(Path(path).read_bytes(), compresslevel=9))


def evaluate(backend: Backend, deploy_path: Path, dataset: Dataset) -> dict:
    """accuracy on the held-out test split, size of the deploy file, median batch-1 latency."""
    deploy_path = Path(deploy_path)
    return {
        "accuracy": accuracy(backend, deploy_path, dataset.x_test, dataset.y_test),
        "size_bytes": deploy_path.stat().st_size,
        "latency_ms": backend.latency_ms(deploy_path, dataset.x_test[:1]),
    }
