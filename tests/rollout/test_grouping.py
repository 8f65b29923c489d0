"""Grouping of LM calls into GRPO groups: truncate, fill and ragged on a variably invoked predictor."""

import random

import pytest

from espalier.rollout.grouping import build_groups
from espalier.types import LMCall, Rollout


def _call(predictor: str, invocation: int, token: int) -> LMCall:
    return LMCall(predictor=predictor, invocation=invocation, prompt_ids=(1, 2), completion_ids=(token,))


def _runs() -> list[Rollout]:
    """Example 0, three runs: `hop` called 1, 3 and 2 times; `final` once each."""
    runs = []
    for run, (hops, reward) in enumerate([(1, 0.0), (3, 1.0), (2, 0.5)]):
        calls = [_call("hop", i, 100 * run + i) for i in range(hops)] + [_call("final", 0, 100 * run + 50)]
        runs.append(Rollout(example_index=0, calls=tuple(calls), reward=reward))
    return runs


def _tokens(group) -> list[int]:
    return [s.completion_ids[0] for s in group.samples]


def test_truncate_keeps_slots_every_run_reached():
    groups = build_groups(_runs(), ["hop", "final"], "truncate")
    assert [g.key for g in groups] == ["ex0/hop/0", "ex0/final/0"]
    assert _tokens(groups[0]) == [0, 100, 200]
    assert [s.reward for s in groups[0].samples] == [0.0, 1.0, 0.5]


def test_ragged_keeps_every_call_once():
    groups = build_groups(_runs(), ["hop", "final"], "ragged")
    assert [g.key for g in groups] == ["ex0/hop/0", "ex0/hop/1", "ex0/hop/2", "ex0/final/0"]
    assert [_tokens(g) for g in groups] == [[0, 100, 200], [101, 201], [102], [50, 150, 250]]
    total_calls = sum(len(r.calls) for r in _runs())
    assert sum(len(g.samples) for g in groups) == total_calls  # nothing dropped


def test_fill_max_repeats_each_runs_last_call():
    groups = build_groups(_runs(), ["hop"], "fill", "max")
    assert [_tokens(g) for g in groups] == [[0, 100, 200], [0, 101, 201], [0, 102, 201]]


def test_fill_randint_draws_from_the_same_run():
    groups = build_groups(_runs(), ["hop"], "fill", "randint", random.Random(3))
    assert all(len(g.samples) == 3 for g in groups)
    for g in groups:
        assert g.samples[0].completion_ids == (0,)  # run 0 made one call: every slot is filled from it
        assert g.samples[0].reward == 0.0


def test_examples_group_separately_and_empty_completions_are_skipped():
    runs = _runs() + [
        Rollout(example_index=1, calls=(_call("hop", 0, 7),), reward=1.0),
        Rollout(example_index=1, calls=(LMCall("hop", 0, (1,), ()),), reward=0.0),
    ]
    groups = build_groups(runs, ["hop"], "ragged")
    assert [g.key for g in groups][-1] == "ex1/hop/0"
    assert _tokens(groups[-1]) == [7]


def test_unknown_mode_is_an_error():
    with pytest.raises(ValueError, match="truncate, fill or ragged"):
        build_groups(_runs(), ["hop"], "spread")
