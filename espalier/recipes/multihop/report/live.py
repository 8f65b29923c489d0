"""`LiveReport`: keeps `run.json` and the report of `espalier run multihop` current during the run.

Plugged into `ArborGRPO.on_validation`: after each validation it records the checkpoints the
server saved and the best one so far in `run.json`, and rewrites the report from the
compiler's history. At the first validation it also runs a few dev examples on the base
model (the "before" column); `finish` runs them on the returned program ("after").
A report that fails to refresh is logged, never allowed to stop the training it reports on.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import dspy

from espalier.history import Record
from espalier.recipes.multihop.manifest import RunManifest, saved_checkpoints
from espalier.recipes.multihop.report import write_report
from espalier.recipes.multihop.report.curves import Curves
from espalier.recipes.multihop.report.page import ReportPage
from espalier.recipes.multihop.scoring import ExampleResult, score_examples

logger = logging.getLogger("espalier")


class LiveReport:
    def __init__(
        self,
        run_dir: Path,
        manifest: RunManifest,
        history: list[Record],
        start: float,
        total_steps: int,
        examples: Sequence[dspy.Example],
        base_program: dspy.Module,
        adapter: dspy.Adapter,
        num_threads: int,
        first_search_recall: float | None = None,
    ):
        self.run_dir, self.manifest, self.history, self.start = Path(run_dir), manifest, history, start
        self.total_steps, self.examples, self.base_program = total_steps, list(examples), base_program
        self.adapter, self.num_threads, self.first_search_recall = adapter, num_threads, first_search_recall
        self.before: list[ExampleResult] = []
        self.after: list[ExampleResult] = []
        self.after_label = ""
        self.manifest.write(self.run_dir)

    @property
    def path(self) -> Path:
        return self.run_dir / "report.html"

    def on_validation(self, step: int, result: Any = None) -> None:
        try:
            if not self.before:
                self.before = self._score(self.base_program, "report: baseline examples")
            saved = saved_checkpoints(self.run_dir)
            best = list(saved)[-1] if saved else "base"  # single-best saves only improvements: the last is the best
            self._update(saved, best, finished=False)
        except Exception:  # noqa: BLE001 - the report must not stop the run it reports on
            logger.exception("could not refresh the report at step %d", step)

    def finish(self, program: dspy.Module) -> Path:
        """The returned program's examples, the final checkpoints, the final page."""
        model = program.predictors()[0].lm.model
        best = model.split("@", 1)[1] if "@" in model else None
        try:
            self.after, self.after_label = self._score(program, "report: best checkpoint examples"), f"returned program ({best or 'current policy'})"
            self._update(saved_checkpoints(self.run_dir), best, finished=True)
        except Exception:  # noqa: BLE001 - the run is done; its summary must still be printed
            logger.exception("could not write the final report")
        return self.path

    def _score(self, program: dspy.Module, desc: str) -> list[ExampleResult]:
        return score_examples(program, self.examples, self.num_threads, self.adapter, desc=desc)

    def _update(self, saved: dict[str, str], best: str | None, finished: bool) -> None:
        self.manifest = replace(self.manifest, checkpoints=saved, best_checkpoint=best)
        self.manifest.write(self.run_dir)
        m = self.manifest
        page = ReportPage(
            run_dir=str(self.run_dir), model=m.model, adapter=m.adapter, data=m.data, total_steps=self.total_steps,
            curves=Curves.from_history(self.history, self.start, self.first_search_recall), finished=finished, before=self.before,
            after=self.after, after_label=self.after_label,
        )  # fmt: skip
        write_report(self.run_dir, page)
