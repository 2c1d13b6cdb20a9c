"""Recommender: pick the technique that best serves the user's goal within their constraints.

Pure and light (the web process imports it): plain dicts in, a dict out.

Constraints (any subset; a missing or None limit is not checked), 1 MB = 2**20 bytes:
  max_accuracy_drop  run["accuracy_drop"] (points)            <= limit
  max_size_mb        run["size_bytes"] / 2**20                <= limit
  max_latency_ms     run["estimates"]["latency_ms"] (device)  <= limit
  max_memory_mb      run["estimates"]["memory_mb"] (device)   <= limit
  max_energy_mj      run["estimates"]["energy_mj"] (device)   <= limit
A constraint whose value the run lacks (no estimate, say) is not met: it fails that run's
check, never the experiment.

Goals, each a score in (0, 1], higher is better, over the completed runs that pass:
  min_size      best_size / size
  min_latency   best_latency / latency            (estimated device latency)
  min_energy    best_energy / energy              (estimated device energy per inference)
  max_accuracy  accuracy / best_accuracy
  balanced      (size_score * latency_score * accuracy_score) ** (1/3), a geometric mean with
                equal weights, where accuracy_score = 1 / (1 + max(accuracy_drop, 0)): each point
                of accuracy lost weighs like doubling the size or the latency at one point.
"best" is the best value among the runs being ranked. Ties (equal scores to 6 decimals) go
to the smaller accuracy drop, then the smaller file, then the technique name alphabetically.
For max_accuracy, runs whose 95% accuracy interval (evaluator: Wilson, on the test split)
overlaps the leader's are within the noise of the test set: they count as tied, and the
smallest file among them goes first; the reasoning says so.

When no completed run meets every constraint, the recommendation is the run closest to
meeting them: the smallest sum of normalised violations, (value - limit) / limit per failed
constraint, with satisfied = False and the misses spelled out.
"""
from __future__ import annotations

import math

from optimization.catalog import CONSTRAINT_NAMES, CONSTRAINTS, GOAL_NAMES, GOALS

MB = 2**20
# below these a limit is treated as this small for the normalised violation (no division by 0)
LIMIT_FLOOR = {"max_accuracy_drop": 0.1, "max_size_mb": 0.001, "max_latency_ms": 0.001, "max_memory_mb": 0.001,
               "max_energy_mj": 0.001}


def constraint_value(run: dict, name: str) -> float | None:
    estimates = run.get("estimates") or {}
    value = {
        "max_accuracy_drop": run.get("accuracy_drop"),
        "max_size_mb": run["size_bytes"] / MB if run.get("size_bytes") is not None else None,
        "max_latency_ms": estimates.get("latency_ms"),
        "max_memory_mb": estimates.get("memory_mb"),
        "max_energy_mj": estimates.get("energy_mj"),
    }[name]
    return None if value is None else float(value)


def _limits(constraints: dict | None) -> dict:
    unknown = set(constraints or {}) - set(CONSTRAINT_NAMES)
    if unknown:
        raise ValueError(f"unknown constraint(s) {', '.join(sorted(unknown))}; use {', '.join(CONSTRAINT_NAMES)}")
    return {k: float(v) for k, v in (constraints or {}).items() if v is not None}


def constraints_met(run: dict, constraints: dict | None) -> dict[str, bool]:
    """{constraint: met} for every constraint given; a metric the run lacks does not meet it."""
    met = {}
    for name, limit in _limits(constraints).items():
        value = constraint_value(run, name)
        met[name] = value is not None and value <= limit + 1e-12
    return met


def violation(run: dict, constraints: dict | None) -> float:
    total = 0.0
    for name, limit in _limits(constraints).items():
        value = constraint_value(run, name)
        if value is None:
            return math.inf
        total += max(0.0, value - limit) / max(abs(limit), LIMIT_FLOOR[name])
    return total


def _goal_value(run: dict, goal: str) -> float | None:
    estimates = run.get("estimates") or {}
    value = {
        "min_size": run.get("size_bytes"),
        "min_latency": estimates.get("latency_ms"),
        "min_energy": estimates.get("energy_mj"),
        "max_accuracy": run.get("accuracy"),
    }.get(goal)
    return None if value is None or value <= 0 else float(value)


def scores(runs: list[dict], goal: str) -> dict[str, float | None]:
    """The goal's score per technique (formulas in the module docstring)."""
    if goal == "balanced":
        size, latency = scores(runs, "min_size"), scores(runs, "min_latency")
        out = {}
        for run in runs:
            name, drop = run["technique"], run.get("accuracy_drop")
            if size[name] is None or latency[name] is None or drop is None:
                out[name] = None
                continue
            accuracy_score = 1.0 / (1.0 + max(float(drop), 0.0))
            out[name] = (size[name] * latency[name] * accuracy_score) ** (1 / 3)
        return out
    values = {run["technique"]: _goal_value(run, goal) for run in runs}
    known = [v for v in values.values() if v is not None]
    if not known:
        return {name: None for name in values}
    if goal == "max_accuracy":
        best = max(known)
        return {name: None if v is None else v / best for name, v in values.items()}
    best = min(known)
    return {name: None if v is None else best / v for name, v in values.items()}


def _order_key(run: dict, score: float | None):
    return (score is None, -round(score or 0.0, 6), run.get("accuracy_drop", math.inf),
            run.get("size_bytes", math.inf), run["technique"])


def recommend(baseline: dict, runs: list[dict], goal: str, constraints: dict | None) -> dict:
    if goal not in GOALS:
        raise ValueError(f"unknown goal {goal!r}; use one of {', '.join(GOAL_NAMES)}")
    limits = _limits(constraints)
    completed = [r for r in runs if r.get("status") == "completed"]
    not_considered = [r for r in runs if r.get("status") != "completed"]
    met = {r["technique"]: constraints_met(r, limits) for r in runs}
    passing = [r for r in completed if all(met[r["technique"]].values())]

    pool = passing or completed
    goal_scores = scores(pool, goal)
    noise_tied: list[dict] = []
    if passing:
        ordered = sorted(passing, key=lambda r: _order_key(r, goal_scores[r["technique"]]))
        if goal == "max_accuracy":
            ordered, noise_tied = _break_accuracy_ties(ordered)
    else:
        ordered = sorted(completed, key=lambda r: (violation(r, limits),) + _order_key(r, goal_scores[r["technique"]]))

    # ranked runs first, then the rejected ones, then those that did not finish
    ranking = [_ranking_row(r, goal_scores.get(r["technique"]), met, limits) for r in ordered]
    ranking += [_ranking_row(r, None, met, limits)
                for r in sorted((r for r in completed if r not in ordered), key=lambda r: r["technique"])]
    ranking += [_ranking_row(r, None, met, limits) for r in sorted(not_considered, key=lambda r: r["technique"])]

    if not completed:
        reasoning = "No technique finished, so there is nothing to recommend. " + _not_considered(not_considered)
        return {"technique": None, "satisfied": False, "ranking": ranking, "reasoning": reasoning}
    winner = ordered[0]
    parts = [f"Goal: {GOALS[goal].description}. {_formula(goal)}"]
    if passing:
        parts.append(f"{winner['technique']} is recommended: {_describe(winner, baseline, goal)}; "
                     f"it {_meets_all(limits)}.")
        tie = [r for r in ordered[1:] if round(goal_scores[r['technique']] or 0, 6) ==
               round(goal_scores[winner['technique']] or 0, 6)]
        if noise_tied:
            parts.append(f"{_names(noise_tied)} are within the measurement noise of each other on accuracy (their 95% "
                         f"intervals on {winner.get('accuracy_n')} test samples overlap), so they count as tied and "
                         "the smallest file among them is recommended.")
        elif tie:
            parts.append(f"It ties with {', '.join(r['technique'] for r in tie)} on the goal's score; ties go to the "
                         "smaller accuracy drop, then the smaller file, then the name in alphabetical order.")
        if len(ordered) > 1:
            runner = ordered[1]
            parts.append(f"Runner-up: {runner['technique']} ({_describe(runner, baseline, goal)}).")
        for run in sorted((r for r in completed if r not in passing), key=lambda r: r["technique"]):
            parts.append(f"{run['technique']} is rejected: {_misses(run, limits)}.")
    else:
        parts.append(f"No technique meets every constraint. {winner['technique']} comes closest: "
                     f"{_describe(winner, baseline, goal)}, but {_misses(winner, limits)}.")
        for run in ordered[1:]:
            parts.append(f"{run['technique']}: {_misses(run, limits)}.")
    if not_considered:
        parts.append(_not_considered(not_considered))
    return {"technique": winner["technique"], "satisfied": bool(passing), "reasoning": " ".join(parts),
            "ranking": ranking}


def _break_accuracy_ties(ordered: list[dict]) -> tuple[list[dict], list[dict]]:
    """Runs whose 95% accuracy interval overlaps the most accurate run's cannot be told apart on
    this test set: among them the smaller file goes first. Returns the new order and the tied
    group (empty when the leader stands clear or the runs carry no interval)."""
    leader = ordered[0]
    if leader.get("accuracy_low") is None:
        return ordered, []
    tied = [r for r in ordered if r.get("accuracy_high") is not None
            and r["accuracy_high"] >= leader["accuracy_low"]]
    if len(tied) < 2:
        return ordered, []
    tied.sort(key=lambda r: (r.get("size_bytes", math.inf), r["technique"]))
    return tied + [r for r in ordered if r not in tied], tied


def _names(runs: list[dict]) -> str:
    names = [r["technique"] for r in runs]
    return ", ".join(names[:-1]) + " and " + names[-1]


def _ranking_row(run: dict, score: float | None, met: dict, limits: dict) -> dict:
    return {"technique": run["technique"], "score": None if score is None else round(score, 4),
            "constraints_met": met[run["technique"]], "status": run.get("status"),
            "considered": run.get("status") == "completed",
            "passes": run.get("status") == "completed" and all(met[run["technique"]].values()),
            "violation": round(violation(run, limits), 4) if run.get("status") == "completed" else None}


def _formula(goal: str) -> str:
    if goal == "balanced":
        return ("Score = geometric mean of (smallest size / size), (lowest device latency / latency) and "
                "1 / (1 + accuracy drop in points).")
    return {"min_size": "Ranked by file size.", "min_latency": "Ranked by estimated latency on the target device.",
            "min_energy": "Ranked by estimated energy per inference on the target device.",
            "max_accuracy": "Ranked by accuracy."}[goal]


def _describe(run: dict, baseline: dict, goal: str) -> str:
    bits = []
    if run.get("size_bytes") is not None:
        size = f"{run['size_bytes'] / MB:.3f} MB"
        if baseline.get("size_bytes"):
            size += f" ({baseline['size_bytes'] / run['size_bytes']:.2f}x smaller than the baseline)"
        bits.append(size)
    if run.get("accuracy") is not None:
        bits.append(f"accuracy {run['accuracy'] * 100:.2f}% (drop {run.get('accuracy_drop', 0):.2f} points)")
    estimates = run.get("estimates") or {}
    if estimates.get("latency_ms") is not None:
        device = estimates.get("device", "the target")
        bits.append(f"estimated {estimates['latency_ms']:.2f} ms on {device}")
    if goal == "min_energy" and estimates.get("energy_mj") is not None:
        bits.append(f"{estimates['energy_mj']:.2f} mJ per inference")
    if estimates.get("memory_mb") is not None and goal != "min_energy":
        bits.append(f"{estimates['memory_mb']:.1f} MB peak memory")
    return ", ".join(bits)


def _meets_all(limits: dict) -> str:
    if not limits:
        return "had no constraints to meet"
    words = []
    for name, limit in limits.items():
        label, unit = CONSTRAINTS[name].label, CONSTRAINTS[name].unit
        words.append(f"{label} <= {limit:g} {unit}")
    return "meets every constraint (" + ", ".join(words) + ")"


def _misses(run: dict, limits: dict) -> str:
    misses = []
    for name, limit in limits.items():
        value = constraint_value(run, name)
        label, unit = CONSTRAINTS[name].label, CONSTRAINTS[name].unit
        if value is None:
            misses.append(f"fails {name}: no {label} was measured")
        elif value > limit + 1e-12:
            misses.append(f"fails {name}: {label} {value:.3g} {unit} is {value - limit:.3g} {unit} over the "
                          f"{limit:g} {unit} limit")
    return "; ".join(misses) if misses else "meets every constraint"


def _not_considered(runs: list[dict]) -> str:
    if not runs:
        return ""
    items = [f"{r['technique']} ({r.get('status', 'unknown')}: {r.get('error') or 'no result'})" for r in
             sorted(runs, key=lambda r: r["technique"])]
    return "Not considered: " + "; ".join(items) + "."
