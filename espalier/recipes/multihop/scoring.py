"""Per-example scoring of a multi-hop program: what it searched, what it found, what it scored.

`score_examples` runs the program once per example (threads, progress bar) and returns one
`ExampleResult` per example. The search queries are recorded by `SearchLog`, a wrapper around
the program's search that appends to a per-run context variable, so a run that fails later
(a format failure on the second hop) still shows the queries it issued before failing.
Scores follow validation: recall, with a failed run scored 0 and its reason kept.
"""

from __future__ import annotations

import contextvars
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import dspy

from espalier.recipes.multihop.metric import passage_title, recall
from espalier.recipes.multihop.program import Search, get_search
from espalier.rollout.rewards import Scored, score_run
from espalier.rollout.runner import EvalResult, map_threads

_SEARCHES: contextvars.ContextVar[list[tuple[str, list[str]]] | None] = contextvars.ContextVar(
    "espalier_searches", default=None
)


@dataclass(frozen=True)
class ExampleResult:
    index: int  # position in the evaluated split
    claim: str  # the claim or question
    queries: list[str]  # every search query, in order (the first is the claim itself)
    retrieved_titles: list[str]  # titles of the passages each search returned, in order, deduplicated
    gold_titles: list[str]
    score: float  # recall; 0 for a failed run
    failure: str | None  # "format: ...", "error: ...", "metric: ..." or None

    @property
    def format_failure(self) -> bool:
        return self.failure is not None and self.failure.startswith("format")

    def to_dict(self) -> dict:
        return asdict(self)


class SearchLog:
    """A search that records (query, titles) into the current run's log, if one is open."""

    def __init__(self, search: Search):
        self.search = search

    def __call__(self, query: str, k: int) -> list[str]:
        passages = list(self.search(query, k))
        log = _SEARCHES.get()
        if log is not None:
            log.append((query, [passage_title(p) for p in passages]))
        return passages

    def __deepcopy__(self, memo: dict) -> SearchLog:  # programs are deep-copied; the log is per run, not per copy
        return self


def with_search_log(program: dspy.Module) -> dspy.Module:
    """A copy of a `ResearchHop`-like program (a `search` attribute) whose searches are recorded."""
    copy = program.deepcopy()
    search = copy.search if getattr(copy, "search", None) is not None else get_search()
    copy.search = search if isinstance(search, SearchLog) else SearchLog(search)
    return copy


def score_examples(
    program: dspy.Module,
    examples: Sequence[dspy.Example],
    num_threads: int,
    adapter: dspy.Adapter | None = None,
    desc: str = "eval",
) -> list[ExampleResult]:
    """Run `program` (searches recorded) once per example, in order."""
    logged = with_search_log(program)

    def one(item: tuple[int, dspy.Example]) -> ExampleResult:
        index, example = item
        searches: list[tuple[str, list[str]]] = []
        token = _SEARCHES.set(searches)
        try:
            with dspy.context(adapter=adapter) if adapter else dspy.context():
                scored = score_run(logged, example, recall, failure_score=0.0, format_failure_score=0.0)
        finally:
            _SEARCHES.reset(token)
        titles = [t for _, found in searches for t in found]
        return ExampleResult(
            index=index,
            claim=example.claim,
            queries=[q for q, _ in searches],
            retrieved_titles=list(dict.fromkeys(titles)),
            gold_titles=list(example.titles),
            score=scored.reward,
            failure=scored.failure,
        )

    return map_threads(one, list(enumerate(examples)), num_threads, desc)


def summarize(results: Sequence[ExampleResult]) -> EvalResult:
    """Mean recall and failure rates, as validation reports them."""
    return EvalResult.of([Scored(r.score, r.failure) for r in results])
