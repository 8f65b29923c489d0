"""Scoring runs: metric values, partial format credit, exceptions kept with their reason."""

import dspy
import pytest
from dspy.utils import DummyLM

from espalier.rollout.rewards import score_run


class TwoFields(dspy.Signature):
    question: str = dspy.InputField()
    answer: str = dspy.OutputField()
    confidence: str = dspy.OutputField()


def _metric(example, pred, trace=None):
    return float(pred.answer == example.answer)


def _run(fields: dict, **kw):
    program = dspy.Predict(TwoFields)
    program.lm = DummyLM([fields])  # writes the given fields in ChatAdapter format
    example = dspy.Example(question="q", answer="Paris").with_inputs("question")
    with dspy.context(adapter=dspy.ChatAdapter(use_json_adapter_fallback=False)):
        return score_run(program, example, _metric, failure_score=0.0, format_failure_score=-1.0, **kw)


def test_clean_run_scores_with_metric():
    scored = _run({"answer": "Paris", "confidence": "high"})
    assert scored.reward == 1.0 and scored.failure is None


def test_partial_format_credit_is_linear_in_parsed_fields():
    scored = _run({"answer": "Paris"})  # 1 of 2 fields parsed
    assert scored.reward == pytest.approx(-0.5)
    assert scored.format_failure and "confidence" in scored.failure


def test_nothing_parsed_gets_format_failure_score():
    scored = _run({"notes": "just some prose"})
    assert scored.reward == pytest.approx(-1.0)


def test_exception_gets_failure_score_and_reason():
    def broken(**kw):
        raise ConnectionError("retriever down")

    example = dspy.Example(question="q", answer="a").with_inputs("question")
    scored = score_run(broken, example, _metric, failure_score=0.25, format_failure_score=-1.0)
    assert scored.reward == 0.25
    assert scored.failure == "error: ConnectionError: retriever down"
