"""Every setting of the server process, written once: `espalier serve`'s flags, `espalier.init()`'s and
`espalier.serve()`'s keyword arguments and what the app reads are all this dataclass's fields.

    options = ServerOptions(model="HuggingFaceTB/SmolLM2-135M-Instruct", inference_replicas=2)
    argv = to_argv(options)                       # how `init()` starts the server process
    options = parse_server_options(argv)          # how the process reads them back
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from espalier.flags import add_flags, from_args, to_argv
from espalier.inference.factory import ENGINES

if TYPE_CHECKING:
    from espalier.training.distributed import TrainNodes

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


def _help(text: str, **more) -> dict:
    return {"help": text, **more}


@dataclass(frozen=True)
class ServerOptions:
    model: str = field(default=DEFAULT_MODEL, metadata=_help("HF id, local HF dir or .gguf"))
    engine: str = field(default="auto", metadata=_help(
        "auto (vLLM on a CUDA machine where it is installed, else the transformers engine) | vllm | transformers",
        choices=ENGINES))
    host: str = field(default="127.0.0.1", metadata=_help("address to bind (0.0.0.0: every interface)"))
    port: int = field(default=0, metadata=_help("0 = a free port"))
    api_key: str | None = field(default=None, metadata=_help(
        "the key clients must send as a Bearer token (default: $ESPALIER_API_KEY; none: no key)"))
    num_inference_gpus: int = field(default=0, metadata=_help("GPUs for the engine (0 = CPU)"))
    inference_replicas: int = field(default=1, metadata=_help(
        "run N engine processes and spread requests over them (fewest in flight first); --num-inference-gpus is "
        "split evenly between them, CPU cores likewise. A replica that dies is restarted and its requests are "
        "retried on another; /health lists the replicas", metavar="N"))
    adapter: Path | None = field(default=None, metadata=_help("serve this saved peft adapter as the current policy"))
    run_dir: Path = field(default=Path("runs/serve"), metadata=_help("where jobs write adapters, checkpoints, logs"))
    max_body_bytes: int = field(default=64 * 1024 * 1024, metadata=_help("larger request bodies get 413"))
    request_timeout: float = field(default=600.0, metadata=_help("seconds a generation may take before it fails"))
    engine_start_timeout: float = field(default=900.0, metadata=_help("seconds the engine may take to start"))
    record_trained: bool = field(default=False, metadata=_help(
        "append every sequence the trainer feeds to RUN_DIR/trained/step-N.jsonl (audits, tests)"))
    train_processes: int = field(default=0, metadata=_help(
        "train GRPO jobs on N CPU processes (gloo) per node, for CPU clusters and tests; 0 = follow the job's "
        "num_training_gpus"))
    train_in_process: bool = field(default=False, metadata=_help(
        "run a GRPO job's trainer in the server's process instead of a worker process (one rank; to debug or "
        "profile the trainer; a trainer that crashes takes the server with it, and a step has no timeout)"))
    train_nodes: int = field(default=1, metadata=_help(
        "train GRPO jobs on N nodes: this one (the head) and N-1 that run `torchrun ... -m espalier.training.join` "
        "(needs --train-rdzv-endpoint)"))
    train_rdzv_endpoint: str | None = field(default=None, metadata=_help(
        "address of this machine where the other training nodes' torchrun meets it (--rdzv-endpoint)",
        metavar="HOST:PORT"))
    train_timeout: float | None = field(default=None, metadata=_help(
        "with --train-nodes: seconds a training collective waits for the other nodes before the job fails "
        "(default: torch's 30 minutes)"))

    def __post_init__(self) -> None:  # paths may be given as strings (`init(run_dir="...")`)
        for name in ("run_dir", "adapter"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Path):
                object.__setattr__(self, name, Path(value))

    def nodes(self) -> TrainNodes | None:
        """The training nodes asked for; None for this node alone. A half-given pair is a ValueError."""
        from espalier.training.distributed import TrainNodes

        if self.train_nodes == 1 and self.train_rdzv_endpoint is None:
            return None
        if self.train_rdzv_endpoint is None:
            raise ValueError(f"--train-nodes {self.train_nodes} needs --train-rdzv-endpoint HOST:PORT, an address of "
                             "this machine that the other nodes reach (the --rdzv-endpoint of their torchrun)")
        timeout = {} if self.train_timeout is None else {"timeout_s": self.train_timeout}
        return TrainNodes(self.train_rdzv_endpoint, self.train_nodes, **timeout)


def server_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="espalier serve", description="Serve a model (and its GRPO job) over HTTP.")
    add_flags(p, ServerOptions)
    return p


def parse_server_options(argv: list[str] | None = None) -> ServerOptions:
    """The options of `argv`, the key from $ESPALIER_API_KEY when not given; a bad flag exits with usage."""
    return with_env_key(from_args(ServerOptions, server_parser().parse_args(argv)))


def with_env_key(options: ServerOptions) -> ServerOptions:
    """`options`, with $ESPALIER_API_KEY as the key when none is given."""
    if options.api_key is None and os.environ.get("ESPALIER_API_KEY"):
        return replace(options, api_key=os.environ["ESPALIER_API_KEY"])
    return options


def server_options(options: ServerOptions | None = None, **settings: Any) -> ServerOptions:
    """`options` with `settings` (ServerOptions fields, e.g. model=, engine=, inference_replicas=) put in, and
    the key from $ESPALIER_API_KEY when none is given; a setting of None keeps the default. An unknown name is
    a TypeError naming the fields."""
    known = {f.name for f in fields(ServerOptions)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise TypeError(f"unknown server settings {unknown}; the settings are {sorted(known)}")
    given = {k: v for k, v in settings.items() if v is not None}
    return with_env_key(replace(options or ServerOptions(), **given))


def server_argv(options: ServerOptions) -> list[str]:
    """Flags for the server process; the API key never goes on a command line, where `ps` shows it."""
    return to_argv(options, skip=("api_key",))

