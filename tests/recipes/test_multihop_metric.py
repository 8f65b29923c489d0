"""recall: hand-computed cases."""

import dspy
import pytest

from espalier.recipes.multihop import make_example, normalize_title, passage_title, recall


def test_recall_counts_share_of_gold_titles_found():
    ex = make_example("c", ["Alpha", "Beta", "Gamma", "Delta"])
    assert recall(ex, dspy.Prediction(titles=["Beta", "Zeta", "Delta"])) == 0.5
    assert recall(ex, dspy.Prediction(titles=[])) == 0.0
    assert recall(ex, dspy.Prediction(titles=["Delta", "Gamma", "Beta", "Alpha", "Eta"]), trace=object()) == 1.0


def test_recall_normalises_case_whitespace_and_underscores():
    ex = make_example("c", ["New_York  City", "Éclair"])
    assert recall(ex, dspy.Prediction(titles=["new york city"])) == 0.5
    assert recall(ex, dspy.Prediction(titles=["new york city", "E\u0301CLAIR"])) == 1.0  # NFC: E + combining acute


def test_recall_reads_retrieved_docs_like_the_tutorial_program():
    ex = dspy.Example(claim="c", titles=["A", "B", "A"]).with_inputs("claim")  # duplicate gold counts once
    pred = dspy.Prediction(retrieved_docs=["A | text about a", "C | other", "A | again"])
    assert recall(ex, pred) == 0.5


def test_recall_rejects_examples_without_gold():
    with pytest.raises(ValueError, match="no gold titles"):
        recall(make_example("c", []), dspy.Prediction(titles=["A"]))


def test_titles_and_normalisation():
    assert passage_title("Foo | bar | baz") == "Foo"
    assert passage_title("no separator") == "no separator"
    assert normalize_title("  The_Big   Sleep ") == "the big sleep"


def test_first_search_recall_is_the_claims_own_search_by_hand():
    from espalier.recipes.multihop.metric import first_search_recall

    corpus = {"a b": ["A | x", "Z | y"], "c d": ["C | z", "C | again"]}  # a fake search: claim -> passages

    def search(query: str, k: int) -> list[str]:
        return corpus[query][:k]

    examples = [make_example("a b", ["A", "B"]), make_example("c d", ["C"])]
    assert first_search_recall(examples, search, 2) == pytest.approx((1 / 2 + 1) / 2)
    assert first_search_recall(examples, search, 1) == pytest.approx((1 / 2 + 1) / 2)
