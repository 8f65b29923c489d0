"""ArborGRPO: train the LM behind a DSPy program with GRPO on the program's own metric.

One step, top to bottom (`ArborGRPO._train_step`):
1. draw k examples (shuffled per epoch with the seed);
2. run the program G times on each, `num_threads` in flight, recording every LM call with its
   exact prompt and completion token ids and sampling log-probs;
3. score each run (format failures get partial credit, errors `failure_score`, both kept);
4. group calls by (example, predictor, invocation) and send every group to the GRPO job,
   which trains on all of them and publishes the new adapter to the engine;
5. validate on schedule and keep checkpoints per `checkpoint`.

Departures from DSPy's GRPO and Arbor's copy of it (ARCHITECTURE.md section 5):
1. The trainer gets the sampled token ids, not prompts rebuilt with another adapter.
2. Every group of a step is trained on; nothing is padded, queued or dropped.
3. `compile` returns the program served by the best checkpoint (`single-best`), not the last.
4. Validation samples at `val_temperature` (greedy by default), not at the rollout temperature.
5. `exclude_demos=False` works: demos stay in rollouts, validation and the returned program.
6. `ragged` and `fill` grouping work; partial format credit works.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import dspy

from espalier.grpo_config import CompileConfig, resolve_sampling
from espalier.grpo_session import (
    Session,
    checkpoint_with_retry,
    restore,
    save_state,
    saved_state,
    start_job,
    step_with_retry,
    terminate,
)
from espalier.history import Record, StepRecord, ValRecord, steps
from espalier.program.provider import GRPOJobError
from espalier.program.served import model_variant, served_copy, single_lm, teachers_of
from espalier.rollout.grouping import build_groups
from espalier.rollout.report import (
    MAX_FAILED_STEPS,
    completion_rows,
    duration,
    failed_for_errors,
    first_error,
    step_line,
    step_metrics,
)
from espalier.rollout.runner import EvalResult, evaluate, rollout_program, run_rollouts
from espalier.tracking import make_tracker
from espalier.types import Group, Rollout

logger = logging.getLogger("espalier")


class RolloutError(RuntimeError):
    """Rollouts keep failing for a reason other than the metric (a dead server, a broken program)."""


class ArborGRPO(dspy.teleprompt.Teleprompter):
    def __init__(
        self,
        metric: Callable | None = None,
        multitask: bool = True,
        train_kwargs: dict[str, Any] | None = None,
        adapter: dspy.Adapter | None = None,
        exclude_demos: bool = False,
        num_threads: int = 6,
        num_train_steps: int = 100,
        seed: int = 0,
        num_dspy_examples_per_grpo_step: int = 1,
        num_rollouts_per_grpo_step: int = 1,
        use_train_as_val: bool = False,
        num_steps_for_val: int = 5,
        report_train_scores: bool = False,
        failure_score: float = 0,
        format_failure_score: float = -1,
        variably_invoked_predictor_grouping_mode: str = "truncate",
        variably_invoked_predictor_fill_strategy: str | None = None,
        checkpoint: str = "single-best",
        val_temperature: float = 0.0,
        run_dir: str | None = None,
    ):
        if metric is None:
            raise ValueError("ArborGRPO needs a metric(example, pred, trace=None) -> float | bool")
        if not multitask:
            raise ValueError("multitask=False (one job per predictor) is not supported: all predictors share one LM")
        from espalier.config import TrainConfig  # validates every train_kwargs key once, here at the edge

        self.metric = metric
        self.adapter = adapter
        self.train_kwargs = dict(train_kwargs or {})
        self.train_config = TrainConfig.from_kwargs(self.train_kwargs)
        self.config = CompileConfig.from_arguments(locals())  # the arguments that are its fields, validated
        self.rng = random.Random(seed)  # draws the examples: the same order whatever the rollouts do
        self.fill_rng = random.Random(seed + 1)  # the grouping's random fill of variably invoked predictors
        self.history: list[Record] = []  # one record per step and per validation (espalier/history.py)
        # Hooks, all optional: see each step's rollouts and groups (logging, tests, custom stop rules),
        # and choose the number that ranks checkpoints (default: the mean validation metric).
        self.on_rollouts: Callable[[list[Rollout]], Any] | None = None
        self.on_groups: Callable[[list[Group]], Any] | None = None
        self.on_validation: Callable[[int, EvalResult], Any] | None = None  # after each validation (and its checkpoint)
        self.validation_score: Callable[[EvalResult], float] = lambda result: result.score
        self._stop = threading.Event()

    def request_stop(self) -> None:
        """Stop after the step in progress (safe from any thread); `compile` then validates and returns."""
        self._stop.set()

    # ----------------------------------------------------------------------------------------
    def compile(
        self,
        student: dspy.Module,
        trainset: Sequence[dspy.Example],
        teacher: dspy.Module | list[dspy.Module] | None = None,
        valset: Sequence[dspy.Example] | None = None,
        **kwargs: Any,
    ) -> dspy.Module:
        cfg = self.config
        lm = single_lm(student)
        sampling = resolve_sampling(lm.kwargs, self.train_kwargs)
        state = saved_state(cfg.run_dir, bool(kwargs.pop("resume", False)))
        run_dir = Path(cfg.run_dir or Path("runs") / time.strftime("grpo-%Y%m%d-%H%M%S"))
        self._report_plan(student, trainset)
        overrides = {**sampling, "logprobs": True}
        run = Session(
            student=student,
            lm=lm,
            trainset=list(trainset),
            valset=self._validation_set(trainset, valset),
            programs=[rollout_program(p, cfg.exclude_demos, overrides) for p in [student, *teachers_of(teacher, student)]],
            predictors=[name for name, _ in student.named_predictors()],
            tracker=make_tracker(self.train_config.report_to, run_dir, {**asdict(cfg), **self.train_kwargs}),
            job=start_job(lm, self._job_kwargs(sampling), state),
            run_dir=run_dir,
        )
        try:
            if state is None:
                self._validate(run, 0)
            else:
                self.history[:] = restore(run, state, self.rng, self.fill_rng)  # in place: hooks hold this list
                if run.steps_done % cfg.num_steps_for_val == 0 and run.last_validated != run.steps_done:
                    self._validate(run, run.steps_done)  # it was cut off by the kill
            done = self._loop(run)
            if run.last_validated != done:
                self._validate(run, done)
            return self._finish(run)
        finally:
            run.tracker.close()
            terminate(run.job)

    def _job_kwargs(self, sampling: dict[str, Any]) -> dict[str, Any]:
        """What the trainer gets: the user's train_kwargs with the one resolved set of sampling settings."""
        return {"num_train_steps": self.config.num_train_steps, **self.train_kwargs, **sampling}

    def _loop(self, run: Session) -> int:
        """GRPO steps until num_train_steps, max_steps or Ctrl-C; returns the steps done."""
        cfg, done = self.config, run.steps_done
        try:
            for step in range(run.steps_done, cfg.num_train_steps):
                if self._stop.is_set():
                    logger.info("stop requested after %d steps", done)
                    break
                record = self._train_step(step, run)
                done = run.steps_done = step + 1
                save_state(run, self.rng, self.fill_rng, self.history)
                run.tracker.log(record["metrics"], done)
                if self.train_config.log_completions and step % self.train_config.logging_steps == 0:
                    run.tracker.log_table("completions", record["completions"], done)
                if record["capped"]:
                    logger.info("max_steps=%s optimizer steps reached: stopping", self.train_config.max_steps)
                    break
                if done % cfg.num_steps_for_val == 0:
                    self._validate(run, done)
        except KeyboardInterrupt:
            logger.warning("interrupted after %d steps: validating and returning the best checkpoint so far", done)
        except GRPOJobError as e:
            if e.status_code != 409:  # 409: the job was cancelled or terminated on the server
                raise
            logger.warning("the GRPO job stopped after %d steps (%s): returning the best checkpoint so far", done, e)
        return done

    # ----------------------------------------------------------------------------------------
    def _train_step(self, step: int, run: Session) -> dict[str, Any]:
        cfg = self.config
        t0 = time.perf_counter()
        examples = self._draw(run)
        rollouts = run_rollouts(
            run.programs,
            examples,
            cfg.num_rollouts_per_grpo_step,
            self.metric,
            cfg.failure_score,
            cfg.format_failure_score,
            cfg.num_threads,
            self.adapter,
            desc=f"step {step + 1}/{cfg.num_train_steps} rollouts",
        )
        t1 = time.perf_counter()
        if self.on_rollouts:
            self.on_rollouts(rollouts)
        groups = build_groups(
            rollouts,
            run.predictors,
            cfg.variably_invoked_predictor_grouping_mode,
            cfg.variably_invoked_predictor_fill_strategy,
            self.fill_rng,
        )
        if self.on_groups:
            self.on_groups(groups)
        trained = step_with_retry(run.job, groups, run.server_steps) if groups else None
        run.server_steps = trained.steps if trained else run.server_steps
        t2 = time.perf_counter()
        metrics = step_metrics(rollouts, groups, list(trained.metrics) if trained else [], t1 - t0, t2 - t1)
        self.history.append(StepRecord(step + 1, time.time(), metrics))
        run.failed_steps = run.failed_steps + 1 if failed_for_errors(rollouts, groups) else 0
        if run.failed_steps >= MAX_FAILED_STEPS:
            raise RolloutError(
                f"{run.failed_steps} consecutive steps had no trainable group because their runs failed, e.g. "
                f"{first_error(rollouts)}; check that the Espalier server is up and the program runs"
            )
        seconds = [r.seconds for r in steps(self.history)]
        eta = sum(seconds) / len(seconds) * (cfg.num_train_steps - step - 1)
        logger.info("%s, about %s left", step_line(step + 1, cfg.num_train_steps, metrics), duration(eta))
        cap = self.train_config.max_steps
        capped = bool(cap) and trained is not None and trained.optimizer_steps >= cap
        return {"metrics": metrics, "completions": completion_rows(rollouts), "capped": capped}

    def _draw(self, run: Session) -> list[tuple[int, dspy.Example]]:
        """k examples, walking a per-epoch seeded shuffle of the trainset."""
        drawn = []
        while len(drawn) < self.config.num_dspy_examples_per_grpo_step:
            if run.cursor >= len(run.order):
                run.order = list(range(len(run.trainset)))
                self.rng.shuffle(run.order)
                run.cursor = 0
            i = run.order[run.cursor]
            run.cursor += 1
            drawn.append((i, run.trainset[i]))
        return drawn

    # ----------------------------------------------------------------------------------------
    def _validation_set(self, trainset, valset):
        cfg = self.config
        if not trainset:
            raise ValueError("trainset is empty")
        if valset is not None and len(valset) > 0:
            if cfg.use_train_as_val:
                raise ValueError("a valset was given and use_train_as_val=True: pass one or the other")
            return list(valset)
        if cfg.use_train_as_val:
            return list(trainset)
        if cfg.checkpoint in ("single-best", "improvements"):
            raise ValueError(
                f"checkpoint={cfg.checkpoint!r} picks checkpoints by validation score, but there is no valset: "
                "pass valset=..., or use_train_as_val=True, or checkpoint='last'"
            )
        return None

    def _validate(self, run: Session, step: int) -> None:
        run.last_validated = step
        if run.valset is None:
            return
        cfg = self.config
        model = run.lm.model if step > 0 else model_variant(run.lm.model, "base")
        program = served_copy(run.student, run.lm, model, cfg.val_temperature, cfg.exclude_demos)
        t0 = time.perf_counter()
        result = evaluate(program, run.valset, self.metric, cfg.num_threads, self.adapter, desc=f"validation @ step {step}")
        metrics = {f"val/{k}": v for k, v in result.to_dict().items()}
        if cfg.report_train_scores and not cfg.use_train_as_val:
            train_result = evaluate(program, run.trainset, self.metric, cfg.num_threads, self.adapter, desc="train score")
            metrics.update({f"train/{k}": v for k, v in train_result.to_dict().items()})
        run.tracker.log(metrics, step)
        self.history.append(ValRecord(step, time.time(), time.perf_counter() - t0, result))
        logger.info(
            "validation @ step %d: score %.3f, format failures %.0f%%, errors %.0f%% (%d examples)",
            step,
            result.score,
            100 * result.format_failure_rate,
            100 * result.error_rate,
            result.num_examples,
        )
        self._keep(step, result, run)
        save_state(run, self.rng, self.fill_rng, self.history)
        if self.on_validation:
            self.on_validation(step, result)

    def _keep(self, step: int, result: EvalResult, run: Session) -> None:
        score = self.validation_score(result)
        if self.config.checkpoint not in ("single-best", "improvements") or score <= run.best_score:
            return
        name = "base" if step == 0 else f"step-{step}"
        if step > 0:
            checkpoint_with_retry(run.job, name)
        run.best_score, run.best_step, run.best_name = score, step, name
        logger.info("new best validation score %.3f at step %d (checkpoint %s)", score, step, name)

    def _finish(self, run: Session) -> dspy.Module:
        mode, model = self.config.checkpoint, run.lm.model
        if mode == "last" and run.job.get_status().get("status") == "running":
            run.job.save_checkpoint("last")
            model = run.job.checkpoint_model("last")
        elif mode in ("single-best", "improvements") and run.best_name is not None:
            model = run.job.checkpoint_model(run.best_name)
            logger.info("returning checkpoint %s (validation %.3f at step %d)", run.best_name, run.best_score, run.best_step)
        final = served_copy(run.student, run.lm, model, self.config.val_temperature, self.config.exclude_demos)
        final._compiled = True
        return final

    def _report_plan(self, student: dspy.Module, trainset) -> None:
        cfg, tc = self.config, self.train_config
        calls = len(student.named_predictors())
        seqs = cfg.num_dspy_examples_per_grpo_step * cfg.num_rollouts_per_grpo_step * calls
        per_update = tc.per_device_train_batch_size * tc.gradient_accumulation_steps * max(tc.num_training_gpus, 1)
        updates = -(-seqs // per_update)
        logger.info(
            "plan: %d steps x (%d examples x %d rollouts) = at least %d sequences/step (%d predictors) -> "
            "at least %d optimizer updates/step of %d sequences; %d train examples",
            cfg.num_train_steps,
            cfg.num_dspy_examples_per_grpo_step,
            cfg.num_rollouts_per_grpo_step,
            seqs,
            calls,
            updates,
            per_update,
            len(trainset),
        )
        if tc.max_steps and tc.max_steps > 0 and tc.max_steps < cfg.num_train_steps * updates:
            logger.warning(
                "max_steps=%d caps optimizer updates below num_train_steps=%d x at least %d updates/step = %d: "
                "training stops after about %d GRPO steps",
                tc.max_steps,
                cfg.num_train_steps,
                updates,
                cfg.num_train_steps * updates,
                tc.max_steps // max(updates, 1),
            )
