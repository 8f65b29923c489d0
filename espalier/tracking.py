"""Where metrics go: `report_to` = wandb, mlflow, tensorboard or none, plus a JSONL file always.

A tracker is a tiny object with `log(metrics, step)`, `log_table(name, rows, step)` and
`close()`; "none" is a null object, so the training loop never tests which one it has.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Protocol

REPORT_TO = ("wandb", "mlflow", "tensorboard", "none")


class Tracker(Protocol):
    def log(self, metrics: dict[str, float], step: int) -> None: ...
    def log_table(self, name: str, rows: list[dict[str, Any]], step: int) -> None: ...
    def close(self) -> None: ...


class NullTracker:
    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_table(self, name: str, rows: list[dict[str, Any]], step: int) -> None:
        pass

    def close(self) -> None:
        pass


class JsonlTracker:
    """metrics.jsonl (one line per log call) and <table>.jsonl in the run directory."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)

    def _append(self, name: str, record: dict[str, Any]) -> None:
        with open(self.run_dir / f"{name}.jsonl", "a") as f:
            f.write(json.dumps(record, default=str) + "\n")

    def log(self, metrics: dict[str, float], step: int) -> None:
        self._append("metrics", {"step": step, **metrics})

    def log_table(self, name: str, rows: list[dict[str, Any]], step: int) -> None:
        for row in rows:
            self._append(name, {"step": step, **row})

    def close(self) -> None:
        pass


class WandbTracker:
    def __init__(self, run_dir: Path, config: dict[str, Any]):
        wandb = _require("wandb", "wandb")
        self.wandb = wandb
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "espalier"), dir=str(run_dir), config=config)

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def log_table(self, name: str, rows: list[dict[str, Any]], step: int) -> None:
        if rows:
            columns = list(rows[0])
            table = self.wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in rows])
            self.run.log({name: table}, step=step)

    def close(self) -> None:
        self.run.finish()


class MlflowTracker:
    def __init__(self, config: dict[str, Any]):
        self.mlflow = _require("mlflow", "mlflow")
        self.mlflow.start_run()
        self.mlflow.log_params({k: str(v)[:250] for k, v in config.items()})

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.mlflow.log_metrics(metrics, step=step)

    def log_table(self, name: str, rows: list[dict[str, Any]], step: int) -> None:
        if rows:
            self.mlflow.log_table({k: [r.get(k) for r in rows] for k in rows[0]}, artifact_file=f"{name}-{step}.json")

    def close(self) -> None:
        self.mlflow.end_run()


class TensorboardTracker:
    def __init__(self, run_dir: Path):
        tb = _require("torch.utils.tensorboard", "tensorboard")
        self.writer = tb.SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))

    def log(self, metrics: dict[str, float], step: int) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, step)

    def log_table(self, name: str, rows: list[dict[str, Any]], step: int) -> None:
        self.writer.add_text(name, "\n\n".join(json.dumps(r, default=str) for r in rows[:20]), step)

    def close(self) -> None:
        self.writer.close()


class MultiTracker:
    def __init__(self, trackers: list[Tracker]):
        self.trackers = trackers

    def log(self, metrics: dict[str, float], step: int) -> None:
        for t in self.trackers:
            t.log(metrics, step)

    def log_table(self, name: str, rows: list[dict[str, Any]], step: int) -> None:
        for t in self.trackers:
            t.log_table(name, rows, step)

    def close(self) -> None:
        for t in self.trackers:
            t.close()


def make_tracker(report_to: str | list[str] | None, run_dir: Path, config: dict[str, Any]) -> Tracker:
    names = [report_to] if isinstance(report_to, str) or report_to is None else list(report_to)
    names = [n or "none" for n in names]
    unknown = [n for n in names if n not in REPORT_TO]
    if unknown:
        raise ValueError(f"report_to={unknown} is not supported; use one of {', '.join(REPORT_TO)}")
    builders = {
        "wandb": lambda: WandbTracker(run_dir, config),
        "mlflow": lambda: MlflowTracker(config),
        "tensorboard": lambda: TensorboardTracker(run_dir),
        "none": NullTracker,
    }
    return MultiTracker([JsonlTracker(run_dir), *(builders[n]() for n in names)])


def _require(module: str, package: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ValueError(
            f"report_to asks for {package}, which is not installed: `pip install {package}` "
            f"(offline: set WANDB_MODE=offline for wandb), or pass report_to='none'"
        ) from e
