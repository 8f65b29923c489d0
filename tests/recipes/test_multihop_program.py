"""ResearchHop end to end with DSPy's DummyLM and a fake or BM25 search."""

import dspy
import pytest
from dspy.utils import DummyLM

from espalier.recipes.multihop import BM25Retriever, ResearchHop, generate_world, recall, set_search

CORPUS = [
    "Mira Tolvane | Mira Tolvane is a novelist born in Brask.",
    "The Salt Orchard | The Salt Orchard is a novel by Mira Tolvane.",
    "Brask | Brask is a town on the Oslen River.",
    "Salt | Salt is a mineral.",
]


class RecordingSearch:
    def __init__(self, passages):
        self.inner, self.queries = BM25Retriever(passages), []

    def __call__(self, query, k):
        self.queries.append((query, k))
        return self.inner(query, k)


def run(program, claim, answers):
    with dspy.context(lm=DummyLM(answers)):
        return program(claim=claim)


def test_two_hops_search_claim_then_followup_and_collect_titles():
    search = RecordingSearch(CORPUS)
    program = ResearchHop(num_docs=2, num_hops=2, search=search)
    answers = [
        {"reasoning": "The novel is by Mira Tolvane.", "new_key_facts": "The Salt Orchard is by Mira Tolvane."},
        {"reasoning": "Find the author.", "followup_search_query": "Mira Tolvane Brask"},
    ]
    claim = "The author of The Salt Orchard was born in Brask."
    pred = run(program, claim, answers)
    assert search.queries == [(claim, 2), ("Mira Tolvane Brask", 2)]
    assert pred.notes == ["The Salt Orchard is by Mira Tolvane."]
    assert pred.titles[0] == "The Salt Orchard"
    assert set(pred.titles) >= {"The Salt Orchard", "Mira Tolvane"}
    assert len(pred.titles) == len(set(pred.titles)) and len(pred.retrieved_docs) == 4
    example = dspy.Example(claim=claim, titles=["The Salt Orchard", "Mira Tolvane", "Brask"]).with_inputs("claim")
    assert recall(example, pred) == len(set(pred.titles) & set(example.titles)) / 3


def test_three_hops_take_notes_twice_and_query_twice():
    search = RecordingSearch(CORPUS)
    answers = [
        {"reasoning": "r", "new_key_facts": "f1"},
        {"reasoning": "r", "followup_search_query": "q1"},
        {"reasoning": "r", "new_key_facts": "f2"},
        {"reasoning": "r", "followup_search_query": "q2"},
    ]
    pred = run(ResearchHop(num_docs=1, num_hops=3, search=search), "claim", answers)
    assert [q for q, _ in search.queries] == ["claim", "q1", "q2"]
    assert pred.notes == ["f1", "f2"]


def test_default_search_is_explicit():
    set_search(None)
    with pytest.raises(ValueError, match="set_search"):
        run(ResearchHop(), "claim", [])
    search = RecordingSearch(CORPUS)
    set_search(search)
    try:
        pred = run(ResearchHop(num_docs=1, num_hops=1), "Brask river", [])
    finally:
        set_search(None)
    assert pred.titles == ["Brask"] and pred.notes == []


def test_a_good_followup_query_raises_recall_on_the_synthetic_world():
    data = generate_world(seed=0, train_size=20, dev_size=0, test_size=0)
    program = ResearchHop(num_docs=4, num_hops=2, search=BM25Retriever(data.corpus))
    example = next(ex for ex in data.train if len(ex.titles) == 2)
    answers = [{"reasoning": "r", "new_key_facts": "f"}, {"reasoning": "r", "followup_search_query": example.titles[1]}]
    pred = run(program, example.claim, answers)
    assert recall(example, pred) == 1.0


def test_program_deepcopies_and_keeps_its_search():
    search = BM25Retriever(CORPUS)
    program = ResearchHop(search=search)
    clone = program.deepcopy()
    assert clone.search is search
    assert [name for name, _ in clone.named_predictors()] == ["generate_query.predict", "append_notes.predict"]
