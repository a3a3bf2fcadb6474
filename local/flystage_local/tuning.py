"""A small local hyperparameter search: one training job of the train image per trial.

The search space is ``flystage.jobdef.tuning_ranges`` of the fixed hyperparameters (the
ranges the SageMaker tuning job gets for the same mode) and the objective is read from each
job's log with the metric regex SageMaker uses (``flystage.jobdef.OBJECTIVE_METRIC``).
Trials run one after another (two cores).

The search itself is deliberately simple and honest: a scrambled Halton sequence, a
quasi-random design that covers the space more evenly than random sampling with a handful of
trials. It is not Bayesian optimisation; SageMaker's tuning job does the real Bayesian
search. Its purpose here is to prove, before paying for it, that every point of the space
trains and reports its objective.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flystage import jobdef
from flystage.files import atomic_write
from flystage_local import LocalModeError
from flystage_local.training import JobResult

# Halton bases: one prime per dimension of the search space.
PRIMES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29)
# SageMaker passes the objective's name to every trial; the training toolkit strips it.
TUNING_OBJECTIVE_HP = "_tuning_objective_metric"


def radical_inverse(index: int, base: int) -> float:
    """The ``index``-th (1-based) Halton coordinate in ``base``: digits mirrored about the point."""
    result, scale = 0.0, 1.0 / base
    while index > 0:
        index, digit = divmod(index, base)
        result += digit * scale
        scale /= base
    return result


@dataclass(frozen=True)
class Dimension:
    """One tunable hyperparameter: maps a unit coordinate u in [0, 1) to its value (a string)."""

    name: str
    kind: str  # continuous, integer or categorical
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    values: tuple[str, ...] = ()

    def value(self, u: float) -> str:
        if self.kind == "categorical":
            return self.values[min(int(u * len(self.values)), len(self.values) - 1)]
        if self.log:
            x = math.exp(math.log(self.low) + u * (math.log(self.high) - math.log(self.low)))
        else:
            x = self.low + u * (self.high - self.low)
        if self.kind == "integer":
            return str(min(int(self.high), max(int(self.low), round(x))))
        return f"{x:.6g}"


def dimensions(ranges: Mapping[str, list[dict]] = jobdef.TUNING_RANGES) -> list[Dimension]:
    """The search space of a SageMaker ``ParameterRanges`` dict."""
    dims = []
    for kind, key in (
        ("continuous", "ContinuousParameterRanges"),
        ("integer", "IntegerParameterRanges"),
    ):
        for r in ranges.get(key, []):
            scaling = r.get("ScalingType", "Auto")
            if scaling == "ReverseLogarithmic":
                raise LocalModeError(
                    f"{r['Name']}: ScalingType ReverseLogarithmic "
                    "is not supported by the local search"
                )
            low, high = float(r["MinValue"]), float(r["MaxValue"])
            if scaling == "Logarithmic" and low <= 0:
                raise LocalModeError(
                    f"{r['Name']}: a logarithmic range needs MinValue > 0, not {low}"
                )
            dims.append(Dimension(r["Name"], kind, low, high, log=scaling == "Logarithmic"))
    for r in ranges.get("CategoricalParameterRanges", []):
        dims.append(Dimension(r["Name"], "categorical", values=tuple(r["Values"])))
    if not dims:
        raise LocalModeError("the tuning ranges are empty: nothing to search")
    if len(dims) > len(PRIMES):
        raise LocalModeError(
            f"{len(dims)} tunable hyperparameters; the local search handles up to {len(PRIMES)}"
        )
    return dims


def trial_points(dims: list[Dimension], trials: int, seed: int = 0) -> list[dict[str, str]]:
    """``trials`` points of a scrambled Halton sequence (a seeded random shift per dimension)."""
    rng = random.Random(seed)
    shift = [rng.random() for _ in dims]
    return [
        {
            d.name: d.value((radical_inverse(i, PRIMES[j]) + shift[j]) % 1.0)
            for j, d in enumerate(dims)
        }
        for i in range(1, trials + 1)
    ]


def trial_count(trials: int, fixed: Mapping[str, str]) -> int:
    """``trials``, refused when the fixed hyperparameters are also tuned, and cut (with a note)
    to ``jobdef.trial_budget``: an exact probe gives the same model at the same point."""
    clash = jobdef.tuned_names(fixed) & set(fixed)
    if clash:
        raise LocalModeError(
            f"hyperparameter(s) {sorted(clash)} are tuned: do not also give them fixed values"
        )
    budget = jobdef.trial_budget(fixed)
    if budget is not None and trials > budget:
        print(
            f"TRIALS={trials} capped to {budget}: the exactly solved probe is deterministic and "
            f"only {', '.join(sorted(jobdef.tuned_names(fixed)))} change it"
        )
        return budget
    return trials


@dataclass
class Trial:
    """One finished trial: its hyperparameters, job and objective (None if it reported none)."""

    number: int
    hyperparameters: dict[str, str]
    job: JobResult
    objective: float | None


def run_search(
    run_job: Callable[[str, dict[str, str]], JobResult],
    trials: int,
    seed: int = 0,
    ranges: Mapping[str, list[dict]] = jobdef.TUNING_RANGES,
    objective: str = jobdef.OBJECTIVE_METRIC,
    report: Callable[[Trial], None] | None = None,
) -> list[Trial]:
    """Run ``trials`` training jobs, one per point, and read each job's objective.

    ``run_job(name_suffix, tuned_hyperparameters)`` runs one job and returns its result (the
    caller adds the fixed hyperparameters and builds the request). The objective is the last
    value the job's first host printed, as SageMaker takes a trial's final metric.
    """
    if trials < 1:
        raise LocalModeError(f"TRIALS={trials}: run at least one trial")
    done = []
    for number, point in enumerate(trial_points(dimensions(ranges), trials, seed), start=1):
        job = run_job(f"{number:03d}", {**point, TUNING_OBJECTIVE_HP: objective})
        values = jobdef.read_metric(job.logs.get("algo-1", ""), objective)
        trial = Trial(number, point, job, values[-1] if values and job.succeeded else None)
        done.append(trial)
        if report:
            report(trial)
    return done


def best_trial(trials: list[Trial], maximise: bool = True) -> Trial | None:
    """The trial with the best objective (ties: the earliest), or None if none reported one."""
    scored = [t for t in trials if t.objective is not None]
    if not scored:
        return None
    return max(scored, key=lambda t: (t.objective if maximise else -t.objective, -t.number))


def table(trials: list[Trial], objective: str = jobdef.OBJECTIVE_METRIC) -> str:
    """A text table of the trials: number, hyperparameters, status, objective, seconds."""
    names = list(trials[0].hyperparameters) if trials else []
    header = ["trial", *names, "status", objective, "seconds"]
    rows = [header] + [
        [
            str(t.number),
            *(t.hyperparameters[n] for n in names),
            t.job.status,
            "-" if t.objective is None else f"{t.objective:.4f}",
            f"{t.job.seconds:.0f}",
        ]
        for t in trials
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows)


def summary(trials: list[Trial], objective: str = jobdef.OBJECTIVE_METRIC) -> dict[str, Any]:
    """JSON-safe record of the search (``tuning.json``)."""
    best = best_trial(trials)
    return {
        "strategy": "scrambled Halton (quasi-random), sequential",
        "objective": {"Type": "Maximize", "MetricName": objective},
        "trials": [
            {
                "trial": t.number,
                "job": t.job.name,
                "status": t.job.status,
                "hyperparameters": t.hyperparameters,
                "objective": t.objective,
                "seconds": t.job.seconds,
                "failure_reason": t.job.failure_reason,
            }
            for t in trials
        ],
        "best": None
        if best is None
        else {
            "trial": best.number,
            "job": best.job.name,
            "hyperparameters": best.hyperparameters,
            "objective": best.objective,
        },
    }


def write_summary(trials: list[Trial], path: Path) -> Path:
    with atomic_write(path) as f:
        f.write(json.dumps(summary(trials), indent=2) + "\n")
    return path
