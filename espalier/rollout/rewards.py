"""Scoring one program run: a bad rollout is data, not a crash.

Departures from DSPy's GRPO / Arbor:
1. Partial format credit is a number: a run whose output failed to parse with `p` of `n`
   output fields parsed scores `format_failure_score + (failure_score - format_failure_score) * p / n`
   (Arbor raises TypeError on this path).
2. Every failure keeps its reason (`"format: ..."`, `"error: ..."`, `"metric: ..."`), so a run
   summary can say why rewards are low.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import dspy
from dspy.utils.exceptions import AdapterParseError

Metric = Callable[..., Any]


@dataclass(frozen=True)
class Scored:
    reward: float
    failure: str | None
    prediction: Any = None

    @property
    def format_failure(self) -> bool:
        return self.failure is not None and self.failure.startswith("format")


def format_credit(error: AdapterParseError, failure_score: float, format_failure_score: float) -> float:
    """Linear partial credit between format_failure_score (nothing parsed) and failure_score (all parsed)."""
    total = len(error.signature.output_fields) if error.signature is not None else 0
    parsed = len(error.parsed_result or {}) if isinstance(error.parsed_result, dict) else 0
    share = parsed / total if total else 0.0
    return format_failure_score + (failure_score - format_failure_score) * share


def score_run(
    program: dspy.Module,
    example: dspy.Example,
    metric: Metric,
    failure_score: float,
    format_failure_score: float,
) -> Scored:
    """Run the program on one example and score it; never raises for a failed run."""
    try:
        prediction = program(**example.inputs())
    except AdapterParseError as e:
        reward = format_credit(e, failure_score, format_failure_score)
        return Scored(reward, f"format: {e.adapter_name} could not parse {_fields(e)}")
    except Exception as e:  # noqa: BLE001 - any failure of the user's program is a scored rollout
        return Scored(failure_score, f"error: {type(e).__name__}: {str(e)[:300]}")
    try:
        score = float(metric(example, prediction))
    except Exception as e:  # noqa: BLE001
        return Scored(failure_score, f"metric: {type(e).__name__}: {str(e)[:300]}", prediction)
    if not math.isfinite(score):  # a NaN reward would reach the weights
        return Scored(failure_score, f"metric: returned {score}", prediction)
    return Scored(score, None, prediction)


def _fields(error: AdapterParseError) -> str:
    if error.signature is None:
        return "the output"
    missing = [k for k in error.signature.output_fields if k not in (error.parsed_result or {})]
    return "fields " + ", ".join(missing) if missing else "the output"
