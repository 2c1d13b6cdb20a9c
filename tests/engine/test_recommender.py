"""Recommender on fixed metric tables: every goal, ties, nothing passing, the wording."""
from __future__ import annotations

import subprocess
import sys

import pytest

from optimization.recommender import constraints_met, recommend

MB = 2**20
BASELINE = {"accuracy": 0.970, "size_bytes": 4 * MB, "latency_ms": 2.0,
            "estimates": {"device": "rpi4", "latency_ms": 40.0, "memory_mb": 30.0, "energy_mj": 250.0}}


def run(technique, accuracy, size_mb, latency_ms, memory_mb, energy_mj, status="completed", **extra):
    return {"technique": technique, "status": status, "accuracy": accuracy,
            "accuracy_drop": round((BASELINE["accuracy"] - accuracy) * 100, 3),
            "size_bytes": int(size_mb * MB), "compression_ratio": 4 / size_mb, "latency_ms": 1.0, "speedup": 2.0,
            "estimates": {"device": "rpi4", "latency_ms": latency_ms, "memory_mb": memory_mb, "energy_mj": energy_mj},
            **extra}


# technique           accuracy  size MB  device ms  memory MB  energy mJ
RUNS = [
    run("ptq_int8",            0.966, 1.0, 20.0, 12.0, 120.0),
    run("ptq_int4",            0.940, 0.6, 22.0, 10.0, 130.0),
    run("prune_unstructured",  0.969, 4.0, 40.0, 30.0, 250.0),
    run("prune_structured",    0.955, 2.0, 15.0, 16.0, 100.0),
    run("distillation",        0.972, 2.5, 30.0, 20.0, 190.0),
    run("qat",                 0.968, 1.0, 21.0, 12.0, 125.0),
    {"technique": "hybrid", "status": "failed", "error": "INT4 kernels missing for Conv"},
]


@pytest.mark.parametrize("goal, winner", [
    ("min_size", "ptq_int4"),
    ("min_latency", "prune_structured"),
    ("min_energy", "prune_structured"),
    ("max_accuracy", "distillation"),
    ("balanced", "qat"),
])
def test_each_goal_picks_its_best_run_without_constraints(goal, winner):
    result = recommend(BASELINE, RUNS, goal, {})
    assert result["technique"] == winner
    assert result["satisfied"] is True
    assert result["ranking"][0]["technique"] == winner


def test_constraints_filter_before_ranking():
    result = recommend(BASELINE, RUNS, "min_size", {"max_accuracy_drop": 1.0})
    assert result["technique"] == "qat"  # int4 is smaller but loses 3 points
    assert "ptq_int4 is rejected: fails max_accuracy_drop" in result["reasoning"]
    assert "3 points is 2 points over the 1 points limit" in result["reasoning"]


def test_device_latency_constraint_uses_the_estimate_not_the_host_latency():
    result = recommend(BASELINE, RUNS, "max_accuracy", {"max_latency_ms": 25.0})
    assert result["technique"] == "qat"
    assert result["ranking"][0]["constraints_met"] == {"max_latency_ms": True}
    assert "distillation is rejected: fails max_latency_ms: estimated latency 30 ms is 5 ms over" in result["reasoning"]


def test_memory_and_size_constraints_are_checked():
    met = constraints_met(RUNS[4], {"max_memory_mb": 16, "max_size_mb": 3})
    assert met == {"max_memory_mb": False, "max_size_mb": True}


def test_reasoning_names_the_winner_with_its_numbers():
    result = recommend(BASELINE, RUNS, "min_size", {"max_accuracy_drop": 1.0, "max_size_mb": 1.5})
    reasoning = result["reasoning"]
    assert "qat is recommended" in reasoning
    assert "1.000 MB (4.00x smaller than the baseline)" in reasoning
    assert "accuracy 96.80% (drop 0.20 points)" in reasoning
    assert "estimated 21.00 ms on rpi4" in reasoning
    assert "size <= 1.5 MB" in reasoning


def test_equal_scores_go_to_the_smaller_accuracy_drop_and_the_tie_is_stated():
    result = recommend(BASELINE, RUNS, "min_size", {"max_accuracy_drop": 1.0})
    # ptq_int8 and qat have the same size; qat loses 0.2 points, ptq_int8 0.4
    assert [row["technique"] for row in result["ranking"][:2]] == ["qat", "ptq_int8"]
    assert "ties with ptq_int8" in result["reasoning"] and "smaller accuracy drop" in result["reasoning"]


def test_identical_runs_are_ordered_by_name():
    twins = [run("qat", 0.96, 1.0, 20.0, 10.0, 100.0), run("distillation", 0.96, 1.0, 20.0, 10.0, 100.0)]
    assert recommend(BASELINE, twins, "balanced", {})["technique"] == "distillation"
    assert recommend(BASELINE, list(reversed(twins)), "balanced", {})["technique"] == "distillation"


def test_nothing_passing_recommends_the_closest_and_says_what_it_misses():
    result = recommend(BASELINE, RUNS, "min_size", {"max_size_mb": 0.5, "max_accuracy_drop": 0.1})
    assert result["satisfied"] is False
    # ptq_int8: size 1.0 MB (+100%), drop 0.4 (+300%); ptq_int4: 0.6 MB (+20%), drop 3 (+2900%);
    # qat: 1.0 MB (+100%), drop 0.2 (+100%) -> closest
    assert result["technique"] == "qat"
    assert "No technique meets every constraint. qat comes closest" in result["reasoning"]
    assert "fails max_size_mb: size 1 MB is 0.5 MB over the 0.5 MB limit" in result["reasoning"]


def test_failed_runs_are_listed_as_not_considered_with_why():
    result = recommend(BASELINE, RUNS, "balanced", {})
    hybrid = next(row for row in result["ranking"] if row["technique"] == "hybrid")
    assert hybrid["considered"] is False and hybrid["score"] is None
    assert result["ranking"][-1]["technique"] == "hybrid"
    assert "Not considered: hybrid (failed: INT4 kernels missing for Conv)" in result["reasoning"]


def test_balanced_formula_is_stated_in_the_reasoning():
    assert "geometric mean" in recommend(BASELINE, RUNS, "balanced", {})["reasoning"]


def test_no_finished_run_gives_no_technique():
    result = recommend(BASELINE, [RUNS[-1]], "balanced", {})
    assert result["technique"] is None and result["satisfied"] is False
    assert "hybrid" in result["reasoning"]


def test_unknown_goal_or_constraint_is_refused():
    with pytest.raises(ValueError, match="goal"):
        recommend(BASELINE, RUNS, "fastest", {})
    with pytest.raises(ValueError, match="max_flops"):
        recommend(BASELINE, RUNS, "balanced", {"max_flops": 1})


def test_importing_the_recommender_loads_no_ml_framework():
    code = "import sys; import optimization.recommender; print('torch' in sys.modules or 'tensorflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_an_energy_limit_filters_and_ranks():
    rec = recommend(BASELINE, RUNS, "min_size", {"max_energy_mj": 122})

    assert rec["technique"] == "ptq_int8"  # ptq_int4 is smaller but spends 130 mJ
    assert rec["satisfied"] is True
    assert constraints_met(RUNS[1], {"max_energy_mj": 122}) == {"max_energy_mj": False}


def test_a_constraint_the_run_has_no_value_for_is_not_met():
    without_estimates = {**RUNS[0], "estimates": {}}

    assert constraints_met(without_estimates, {"max_energy_mj": 1000, "max_size_mb": 2}) == {
        "max_energy_mj": False, "max_size_mb": True}


def test_accuracies_inside_each_others_interval_are_a_tie_that_goes_to_the_smaller_file():
    big = run("qat", 0.990, 0.4, 1.0, 1.0, 1.0, accuracy_n=359, accuracy_low=0.975, accuracy_high=0.996)
    small = run("ptq_int4", 0.986, 0.1, 1.0, 1.0, 1.0, accuracy_n=359, accuracy_low=0.968, accuracy_high=0.994)
    clear = run("distillation", 0.900, 0.05, 1.0, 1.0, 1.0, accuracy_n=359, accuracy_low=0.866, accuracy_high=0.927)
    rec = recommend(BASELINE, [big, small, clear], "max_accuracy", {})
    assert rec["technique"] == "ptq_int4"
    assert "measurement noise" in rec["reasoning"] and "359 test samples" in rec["reasoning"]


def test_a_clearly_more_accurate_run_still_wins_max_accuracy():
    best = run("qat", 0.990, 0.4, 1.0, 1.0, 1.0, accuracy_n=2000, accuracy_low=0.985, accuracy_high=0.994)
    worse = run("ptq_int4", 0.950, 0.1, 1.0, 1.0, 1.0, accuracy_n=2000, accuracy_low=0.940, accuracy_high=0.959)
    rec = recommend(BASELINE, [best, worse], "max_accuracy", {})
    assert rec["technique"] == "qat"
    assert "measurement noise" not in rec["reasoning"]
