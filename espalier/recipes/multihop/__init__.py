"""DSPy's "RL for multi-hop research" recipe, ready to train with Espalier.

from espalier.recipes.multihop import BM25Retriever, ResearchHop, load_multihop, recall

data = load_multihop("synthetic")            # or "hotpotqa:<dir>", "musique:<dir>", "hover:<file>"
program = ResearchHop(num_docs=4, num_hops=2, search=BM25Retriever(data.corpus))
# ArborGRPO(metric=recall, ...).compile(student=program, trainset=data.train, valset=data.dev)
"""

from espalier.recipes.multihop.data import MultihopData, make_example, split_examples
from espalier.recipes.multihop.loaders import (
    SPEC_FORMS,
    load_corpus_jsonl,
    load_hotpotqa,
    load_hover,
    load_multihop,
    load_musique,
)
from espalier.recipes.multihop.metric import normalize_title, passage_title, recall
from espalier.recipes.multihop.program import ResearchHop, get_search, set_search
from espalier.recipes.multihop.retriever import BM25Retriever
from espalier.recipes.multihop.stats import SearchRecall, search_recall
from espalier.recipes.multihop.synthetic import generate_world

__all__ = [
    "SPEC_FORMS",
    "BM25Retriever",
    "MultihopData",
    "ResearchHop",
    "SearchRecall",
    "generate_world",
    "get_search",
    "load_corpus_jsonl",
    "load_hotpotqa",
    "load_hover",
    "load_multihop",
    "load_musique",
    "make_example",
    "normalize_title",
    "passage_title",
    "recall",
    "search_recall",
    "set_search",
    "split_examples",
]
