"""The state shared by the sections of one benchmark run: sizes, the model, the data, servers, results.

Sections ask the context for what they need (`bench.server("vllm")`, `bench.data`) and for
other sections' results (`bench.section("training")`), so each section runs alone
(`--only training`) and a full run starts every server and loads every dataset once.
"""

from __future__ import annotations

import importlib
import os
import signal
import tempfile
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from benchmarks.common import Section, Sizes

# In run order: the sections that use an Espalier server first, so it can be stopped before the rest.
SECTIONS = ("rollouts", "grpo_step", "scaling", "mismatch", "training", "sync", "memory")
SERVER_SECTIONS = ("rollouts", "grpo_step", "scaling", "mismatch")
# `--quick`: the headline figures in under 5 minutes on 2 cores (program runs/min with and without the
# adapter, an ArborGRPO step's split, policy sync); scaling, mismatch and training vs TRL need `--only` or a full run.
QUICK_SECTIONS = ("rollouts", "grpo_step", "sync", "memory")


@dataclass
class Bench:
    sizes: Sizes
    model: str = "HuggingFaceTB/SmolLM2-135M-Instruct"
    engines: tuple[str, ...] = ("vllm", "transformers")
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="espalier-bench-")))
    results: dict[str, Section] = field(default_factory=dict)
    servers: dict[str, dict[str, Any]] = field(default_factory=dict)
    log: Any = print

    @property
    def grpo_engine(self) -> str:
        """The engine of the end-to-end sections: the one `espalier run multihop` picks on this machine
        (`RunOptions().engine`, "auto": vLLM with CUDA, else transformers) when it is benchmarked, else the first."""
        from espalier.inference.factory import pick_engine
        from espalier.recipes.multihop.job import RunOptions

        job = pick_engine(RunOptions().engine)
        return job if job in self.engines else self.engines[0]

    @cached_property
    def model_dir(self) -> Path:
        from espalier.inference.factory import resolve_model_path

        return resolve_model_path(self.model)

    @cached_property
    def data(self):
        """The recipe's default data: the seeded synthetic world (offline)."""
        from espalier.recipes.multihop import generate_world

        return generate_world(seed=0, train_size=64, dev_size=16, test_size=0)

    @cached_property
    def search(self):
        from espalier.recipes.multihop import BM25Retriever

        return BM25Retriever(self.data.corpus)

    def section(self, name: str) -> Section:
        """A section's result, running it first if this run has not yet."""
        if name not in self.results:
            self.log(f"[bench] {name} ...")
            start = time.perf_counter()
            result = importlib.import_module(f"benchmarks.{name}").run(self)
            result.seconds = time.perf_counter() - start
            self.results[name] = result
            self.log(f"[bench] {name} done in {result.seconds:.0f} s")
        return self.results[name]

    @cached_property
    def adapter(self) -> Path:
        """A recipe-shaped LoRA adapter (r 8, every projection, random weights): the policy after a GRPO step."""
        from benchmarks.inference import make_adapter

        return make_adapter(self.model_dir, self.workdir / "policy-adapter", seed=0)

    def server(self, engine: str) -> dict[str, Any]:
        """An Espalier server (`espalier.init`) with this engine, started once per run, serving `adapter`.

        Rollouts during training sample from the current LoRA policy, never from the bare base model,
        so the servers are measured with an adapter active."""
        if engine not in self.servers:
            import espalier

            start = time.perf_counter()
            info = espalier.init(model=str(self.model_dir), engine=engine, run_dir=self.workdir / f"server-{engine}",
                                 adapter=self.adapter)
            self.servers[engine] = {**info, "start_s": time.perf_counter() - start}
        return self.servers[engine]

    def stop_server(self, engine: str) -> None:
        info = self.servers.pop(engine, None)
        if info is not None:
            _stop_group(info["pid"])

    def close(self) -> None:
        for engine in list(self.servers):
            self.stop_server(engine)


def _stop_group(pid: int, timeout: float = 30.0) -> None:
    """Stop a server started by `espalier.init` and every process under it, by pid.

    The server runs in its own session (group = its pid), but its vLLM engine runs in another,
    so the descendants are listed first and any left after the server exits are stopped too."""
    import psutil

    try:
        children = psutil.Process(pid).children(recursive=True)
        os.killpg(pid, signal.SIGTERM)
        psutil.Process(pid).wait(timeout)
    except psutil.TimeoutExpired:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, psutil.NoSuchProcess):
        return
    alive = [c for c in children if c.is_running()]
    for child in alive:
        child.terminate()
    _, left = psutil.wait_procs(alive, timeout=timeout)
    for child in left:
        child.kill()
