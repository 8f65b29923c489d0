"""One `ArborGRPO.compile` call's state, and how it is saved and restored for `compile(..., resume=True)`."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dspy

from espalier.history import Record, record_from_dict
from espalier.program.provider import GRPOJobError
from espalier.resume import CompileState, rng_state, set_rng_state
from espalier.types import JobStatus

logger = logging.getLogger("espalier.grpo")


@dataclass
class Session:
    """The state of one `compile` call."""

    student: dspy.Module
    lm: dspy.LM
    trainset: list[dspy.Example]
    valset: list[dspy.Example] | None
    programs: list[dspy.Module]  # rollout copies: the student first, then teachers
    predictors: list[str]
    tracker: Any
    job: Any  # the provider's ReinforceJob
    last_validated: int = -1
    failed_steps: int = 0  # consecutive steps whose runs failed (not the metric) so that no group trained
    best_score: float = float("-inf")
    best_step: int = -1
    best_name: str | None = None
    run_dir: Path = Path("runs")
    steps_done: int = 0  # GRPO steps of this compile, including steps with no group to train
    server_steps: int = 0  # steps the server trained (a step with no group sends nothing): what a resume asks for
    order: list[int] = field(default_factory=list)  # the epoch's shuffled trainset indices (ArborGRPO._draw)
    cursor: int = 0


def terminate(job) -> None:
    try:
        job.terminate()
    except Exception as e:  # noqa: BLE001 - the result is already computed; say why cleanup failed
        logger.warning("could not terminate the GRPO job cleanly: %s", e)


def step_with_retry(job, groups: list, steps_before: int) -> JobStatus:
    """One GRPO step; after a 503 (the server restarted a dead trainer from the last step) it is sent once more,
    unless the server's step count says it was trained after all (a 503 from publishing the new policy)."""
    try:
        return job.step_groups(groups)
    except GRPOJobError as e:
        if e.status_code != 503:
            raise
        status = JobStatus.from_dict(job.get_status())
        if status.steps > steps_before:
            logger.warning("%s; the server trained the step nonetheless", e)
            return status
        logger.warning("%s; retrying the step once", e)
        return job.step_groups(groups)


def checkpoint_with_retry(job, name: str) -> None:
    """Save a checkpoint; a 503 (a restarted trainer) is retried once (saving it again is harmless)."""
    try:
        job.save_checkpoint(name)
    except GRPOJobError as e:
        if e.status_code != 503:
            raise
        logger.warning("%s; saving checkpoint %s again", e, name)
        job.save_checkpoint(name)


def saved_state(run_dir: str | Path | None, resume: bool) -> CompileState | None:
    """The state a resumed compile goes on from; None for a new run."""
    if not resume:
        return None
    if run_dir is None:
        raise ValueError("compile(..., resume=True) needs ArborGRPO(run_dir=...): the directory of the run to go on with")
    state = CompileState.read(Path(run_dir))
    if state is None:
        logger.warning("resume=True but %s holds no saved run: starting a new one", run_dir)
    else:
        logger.info("resuming %s after step %d (job %s)", run_dir, state.steps_done, state.job_id)
    return state


def start_job(lm: dspy.LM, train_kwargs: dict[str, Any], state: CompileState | None):
    """A new GRPO job, or the saved run's job resumed at its last saved step."""
    if state is None:
        return lm.reinforce(train_kwargs=train_kwargs)
    job = lm.provider.ReinforceJob(lm=lm, train_kwargs=train_kwargs)
    if not hasattr(job, "resume"):
        raise ValueError(f"{type(lm.provider).__name__} cannot resume a GRPO job: use espalier's ArborProvider")
    job.resume(state.job_id, state.server_steps)
    return job


def save_state(run: Session, rng, fill_rng, history: list[Record]) -> None:
    best = None if run.best_score == float("-inf") else run.best_score
    CompileState(
        job_id=run.job.job_id, steps_done=run.steps_done, server_steps=run.server_steps,
        last_validated=run.last_validated,
        failed_steps=run.failed_steps, best_score=best, best_step=run.best_step, best_name=run.best_name,
        rng=rng_state(rng), fill_rng=rng_state(fill_rng), order=run.order, cursor=run.cursor,
        history=[r.to_dict() for r in history],
    ).write(run.run_dir)


def restore(run: Session, state: CompileState, rng, fill_rng) -> list[Record]:
    """Put the saved run's counters, best checkpoint and random state back; returns its history."""
    run.steps_done, run.last_validated, run.failed_steps = state.steps_done, state.last_validated, state.failed_steps
    run.server_steps = state.server_steps
    run.best_score = float("-inf") if state.best_score is None else state.best_score
    run.best_step, run.best_name = state.best_step, state.best_name
    run.order, run.cursor = list(state.order), state.cursor
    set_rng_state(rng, state.rng)
    if state.fill_rng:  # absent from a state saved before the two were split: the fill starts afresh
        set_rng_state(fill_rng, state.fill_rng)
    return [record_from_dict(r) for r in state.history]
