"""Read-only probes around an `ArborGRPO.compile`: timings taken through public hooks, not by changing it.

- `TimedProvider`: an `ArborProvider` whose GRPO job records when `initialize`, each
  `step_groups` and `terminate` start and end, and the status each step returns (with the
  job's `last_swap_ms` and the trainer's per-optimizer-step metrics).
- `LMSpans`: a DSPy callback recording when each LM call starts and ends.
- `Clock`: wraps a function (the metric, the search) and records the time spent inside it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from dspy.utils.callback import BaseCallback

from espalier.program.provider import ArborProvider, ArborReinforceJob
from espalier.types import JobStatus


class TimedJob(ArborReinforceJob):
    events: list[tuple[str, float, float, dict]]  # (what, start, end, returned status)

    def _timed(self, what: str, fn: Callable, *args: Any) -> Any:
        start = time.perf_counter()
        status = fn(*args)
        body = status.to_dict() if isinstance(status, JobStatus) else status  # the status as the server sent it
        self.events.append((what, start, time.perf_counter(), body))
        return status

    def initialize(self):
        return self._timed("initialize", super().initialize)

    def step_groups(self, groups):
        return self._timed("step", super().step_groups, groups)

    def terminate(self):
        return self._timed("terminate", super().terminate)


class TimedProvider(ArborProvider):
    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[str, float, float, dict]] = []
        events = self.events

        def make(lm, train_kwargs=None) -> TimedJob:
            job = TimedJob(lm=lm, train_kwargs=train_kwargs)
            job.events = events
            return job

        self.ReinforceJob = make


class LMSpans(BaseCallback):
    def __init__(self) -> None:
        self.open: dict[str, float] = {}
        self.spans: list[tuple[float, float]] = []
        self._lock = threading.Lock()

    def on_lm_start(self, call_id, instance, inputs):
        with self._lock:
            self.open[call_id] = time.perf_counter()

    def on_lm_end(self, call_id, outputs, exception=None):
        with self._lock:
            self.spans.append((self.open.pop(call_id, time.perf_counter()), time.perf_counter()))

    def busy(self, start: float, end: float) -> float:
        """Seconds in [start, end] with at least one LM call in flight (the union of the spans)."""
        total, cursor = 0.0, start
        for a, b in sorted(self.spans):
            a, b = max(a, cursor), min(b, end)
            if b > a:
                total += b - a
                cursor = b
        return total


class Clock:
    """`Clock(fn)` behaves like fn and records (start, end) of every call."""

    def __init__(self, fn: Callable) -> None:
        self.fn = fn
        self.calls: list[tuple[float, float]] = []

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.calls.append((start, time.perf_counter()))

    def __deepcopy__(self, memo):  # programs are deep-copied for rollouts: keep one clock
        return self

    def within(self, start: float, end: float) -> float:
        """Summed seconds of calls that started in [start, end] (across threads, so not wall time)."""
        return sum(b - a for a, b in self.calls if start <= a <= end)
