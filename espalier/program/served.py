"""The student program as the compiler sees it: its one Espalier LM, its teachers, and copies
that sample from a named policy (`<id>`, `<id>@base`, `<id>@<checkpoint>`) for validation,
reports and the returned program."""

from __future__ import annotations

import dspy


def single_lm(student: dspy.Module) -> dspy.LM:
    lms = {id(p.lm): p.lm for _, p in student.named_predictors() if p.lm is not None}
    missing = [n for n, p in student.named_predictors() if p.lm is None]
    if missing or not lms:
        raise ValueError(f"predictors {missing or 'all'} have no LM: call program.set_lm(local_lm) before compile")
    models = {lm.model for lm in lms.values()}
    if len(models) > 1:
        raise ValueError(f"all predictors must share one Espalier LM, found {sorted(models)}")
    lm = next(iter(lms.values()))
    if not getattr(lm.provider, "reinforceable", False):
        raise ValueError(
            "the program's LM has no reinforceable provider: build it as dspy.LM('openai/arbor:<model>', "
            "provider=ArborProvider(), api_base=espalier.init()['base_url'])"
        )
    return lm


def teachers_of(teacher, student) -> list[dspy.Module]:
    if teacher is None:
        return []
    teachers = teacher if isinstance(teacher, list) else [teacher]
    names = [n for n, _ in student.named_predictors()]
    for t in teachers:
        if [n for n, _ in t.named_predictors()] != names:
            raise ValueError("a teacher program must have the same predictors as the student (same structure)")
    return teachers


def model_variant(model: str, name: str) -> str:
    """'openai/arbor:<id>' -> 'openai/arbor:<id>@<name>': the server's name for a checkpoint's adapter."""
    return f"{model.split('@', 1)[0]}@{name}"


def served_copy(program: dspy.Module, lm: dspy.LM, model: str, temperature: float,
                drop_demos: bool = False) -> dspy.Module:
    """A copy of `program` whose predictors sample from `model` at `temperature`, uncached."""
    copy = program.deepcopy()
    served = lm.copy(model=model, temperature=temperature)
    # No response cache: `<id>` names a policy that changes every step, and `<id>@step-N` or `<id>@base` name
    # the same thing in every run in DSPy's on-disk cache; a cached answer would be another model's.
    served.cache = False
    for _, predictor in copy.named_predictors():
        predictor.lm = served
        if drop_demos:
            predictor.demos = []
    return copy
