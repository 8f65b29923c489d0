"""Ready-made programs, metrics and data for training with Espalier.

`espalier.recipes.multihop` is DSPy's "RL for multi-hop research" recipe: the `ResearchHop`
program, the `recall` metric, BM25 retrieval, a synthetic offline world and loaders for
HotpotQA, MuSiQue and HoVer.
"""
