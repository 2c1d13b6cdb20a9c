"""The whole path with real processes: JSON API → database → django-q2 worker → engine →
progress over the WebSocket (Daphne) → results → download, on the database the suite runs on
(SQLite locally, PostgreSQL in CI)."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest

from optimization.datasets import load_digits_preset

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]


def create_demo_experiment(stack, **overrides) -> int:
    body = {"name": "e2e", "framework": "pytorch", "target_device": "rpi4", "dataset": "digits",
            "goal": "balanced", "constraints": {"max_accuracy_drop": 2.0},
            "techniques": ["ptq_int8"], "pretrained_model": "digits_cnn", **overrides}
    status, experiment, _ = stack.request("POST", "/api/experiments/create", body)
    assert status == 201, experiment
    assert experiment["status"] == "ready"
    return experiment["id"]


def read_until_final(ws, timeout: float) -> list[dict]:
    messages = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        message = json.loads(ws.recv(timeout=max(0.1, deadline - time.monotonic())))
        messages.append(message)
        if message["type"] == "status" and message["status"] in ("completed", "failed", "stopped"):
            return messages
    raise AssertionError(f"no final status within {timeout}s; last: {messages[-3:]}")


def test_ptq_int8_experiment_runs_end_to_end_through_worker_and_websocket(stack, demo_storage):
    experiment_id = create_demo_experiment(stack)
    with stack.websocket(experiment_id) as ws:  # a script client: a token, no Origin
        first = json.loads(ws.recv(timeout=10))  # the current state at once, before anything runs
        assert first["type"] in ("progress", "status")
        status, body, _ = stack.request("POST", f"/api/experiments/{experiment_id}/start")
        assert (status, body["status"]) == (202, "queued")
        messages = read_until_final(ws, timeout=240)

    assert messages[-1]["status"] == "completed", stack.logs()
    progress = [m for m in messages if m["type"] == "progress" and m.get("status") == "running"]
    assert len(progress) >= 3
    overall = [m["overall_progress"] for m in progress]
    assert overall == sorted(overall)
    assert any(m["technique"] == "ptq_int8" for m in progress)

    status, results, _ = stack.request("GET", f"/api/experiments/{experiment_id}/results")
    assert status == 200
    baseline = results["baseline"]
    (run,) = [r for r in results["runs"] if r["technique"] == "ptq_int8"]
    assert run["status"] == "completed", run
    for row in (baseline, run):
        assert row["accuracy"] > 0.9 and row["size_bytes"] > 0 and row["latency_ms"] > 0

    status, data, headers = stack.request("GET", f"/api/experiments/{experiment_id}/download/ptq_int8")
    assert status == 200
    assert "attachment" in headers["Content-Disposition"] and ".onnx" in headers["Content-Disposition"]
    assert len(data) == run["size_bytes"]
    assert len(data) <= 0.35 * baseline["size_bytes"]

    import onnxruntime as ort

    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    digits = load_digits_preset(demo_storage / "dataset" / "preset" / "digits", "NCHW")
    logits = session.run(None, {session.get_inputs()[0].name: digits.x_test})[0]
    accuracy = float((np.argmax(logits, axis=1) == digits.y_test).mean())
    assert accuracy == pytest.approx(run["accuracy"], abs=0.01)
    assert accuracy >= baseline["accuracy"] - 0.02

    status, recommendation, _ = stack.request("GET", f"/api/experiments/{experiment_id}/recommendation")
    assert status == 200 and recommendation["technique"] == "ptq_int8"


def test_stop_during_a_run_ends_it_at_the_next_batch(stack):
    experiment_id = create_demo_experiment(
        stack, techniques=["ptq_int8", "qat", "hybrid"],
        config={"techniques": {"qat": {"epochs": 50}, "hybrid": {"epochs": 50}}})
    with stack.websocket(experiment_id) as ws:
        stack.request("POST", f"/api/experiments/{experiment_id}/start")
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:  # wait until a fine-tuning technique is under way
            message = json.loads(ws.recv(timeout=60))
            if message.get("technique") == "qat" and message.get("technique_progress", 0) > 0:
                break
        else:
            raise AssertionError("qat never started")
        status, body, _ = stack.request("POST", f"/api/experiments/{experiment_id}/stop")
        assert status == 202 and body["status"] in ("stopping", "stopped")
        # the worker stops at the next batch (seconds on a quiet box); the deadline is for a busy
        # one and still far below the 50 epochs of QAT and hybrid left to run
        final = read_until_final(ws, timeout=120)[-1]
        assert final["status"] == "stopped"

    status, results, _ = stack.request("GET", f"/api/experiments/{experiment_id}/results")
    runs = {r["technique"]: r for r in results["runs"]}
    assert results["status"] == "stopped"
    assert runs["ptq_int8"]["status"] == "completed"  # finished work is kept
    assert runs["qat"]["status"] == "stopped"
