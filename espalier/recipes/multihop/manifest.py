"""`run.json`: what a run directory holds, for `espalier eval` and the report (typed, versioned).

`espalier run multihop` writes it at the start and rewrites it after every validation, so a
run can be evaluated while it trains. Checkpoint paths are stored relative to the run
directory, so a copied or moved run directory still resolves them.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

MANIFEST_FILE = "run.json"
MANIFEST_VERSION = 1


@dataclass(frozen=True)
class RunManifest:
    model: str  # what the server was started with (hub id, local dir or .gguf)
    adapter: str  # the DSPy adapter kind: prefill | fieldwise | chat
    data: str  # the --data spec
    corpus: str | None
    seed: int
    train_size: int  # as given to the loader; 0 = the loader's default
    dev_size: int
    num_docs: int
    num_hops: int
    max_tokens: int
    val_temperature: float
    engine: str
    num_inference_gpus: int
    checkpoints: dict[str, str] = field(default_factory=dict)  # name -> adapter directory, relative to the run
    best_checkpoint: str | None = None  # "base", "step-N", or None before the first validation
    version: int = MANIFEST_VERSION

    def write(self, run_dir: Path) -> Path:
        path = Path(run_dir) / MANIFEST_FILE
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        tmp.replace(path)  # a reader (espalier eval during the run) never sees half a file
        return path

    @classmethod
    def read(cls, run_dir: Path) -> RunManifest:
        path = Path(run_dir) / MANIFEST_FILE
        if not path.exists():
            raise ValueError(f"{run_dir} has no {MANIFEST_FILE}: pass a run directory written by `espalier run`")
        raw = json.loads(path.read_text())
        if raw.get("version") != MANIFEST_VERSION:
            raise ValueError(f"{path}: version {raw.get('version')!r}; this Espalier reads version {MANIFEST_VERSION}")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})

    def adapter_dir(self, run_dir: Path, checkpoint: str) -> Path | None:
        """The checkpoint's adapter directory; None for "base" (the model without an adapter)."""
        if checkpoint == "base":
            return None
        short = [k for k in self.checkpoints if k.rsplit("/", 1)[-1] == checkpoint]  # "step-5" for "<job>/step-5"
        if checkpoint not in self.checkpoints and len(short) == 1:
            checkpoint = short[0]
        if checkpoint not in self.checkpoints:
            known = ", ".join(["base", *self.checkpoints]) or "none yet"
            raise ValueError(f"no checkpoint {checkpoint!r} in {run_dir}; known: {known}")
        return Path(run_dir) / self.checkpoints[checkpoint]


def saved_checkpoints(run_dir: Path) -> dict[str, str]:
    """Checkpoints the run's server saved, named as the server serves them: `<job_id>/<name>` for a job's
    (`server/checkpoints/<job_id>/<name>/adapter`), `<name>` for the older flat layout; paths relative to the
    run directory, in step order. Hidden directories (a job's `.state`) are not checkpoints."""
    root = Path(run_dir) / "server" / "checkpoints"
    found = [p for p in (*root.glob("*/adapter"), *root.glob("*/*/adapter"))
             if p.is_dir() and not any(part.startswith(".") for part in p.relative_to(root).parts)]
    found.sort(key=lambda p: (p.parent.parent.stat().st_mtime if p.parent.parent != root else 0,
                              len(p.parent.name), p.parent.name))
    return {str(p.parent.relative_to(root)): str(p.relative_to(run_dir)) for p in found}
