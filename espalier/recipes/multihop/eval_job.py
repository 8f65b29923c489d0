"""`espalier eval`: score a run's checkpoint (or a saved program) on any data split.

The target is a run directory (its `run.json` says the model, DSPy adapter, data and
checkpoints; the best checkpoint unless `--checkpoint NAME`) or a saved `program.json` (its
LM names the checkpoint, `<model>@step-N`). Data is any `--data` spec of `espalier run`,
loaded with the run's seed and split sizes when it is the run's own data, so `dev` is the
run's validation set. A server is started serving the checkpoint's adapter, unless
`--base-url` points at one. Prints recall and failure rates; writes one JSON line per example
(claim, queries, retrieved and gold titles, score, failure).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, replace
from pathlib import Path

import dspy

from espalier.flags import option
from espalier.recipes.multihop.manifest import MANIFEST_FILE, RunManifest
from espalier.recipes.multihop.scoring import ExampleResult, score_examples, summarize

logger = logging.getLogger("espalier")
SPLITS = ("dev", "test", "train", "all")


@dataclass
class EvalOptions:
    """`espalier eval`'s options: its flags and their help are made from these fields (`flags.py`)."""

    target: str  # a run directory (runs/multihop-...) or a saved program.json
    checkpoint: str | None = option(None, "checkpoint to score: base, step-N, ... [default: the run's best, or the "
                                    "program's own]")
    data: str | None = option(None, "synthetic | hotpotqa:PATH | musique:PATH | hover:PATH|hub [default: the run's "
                              "data]")
    corpus: str | None = option(None, "corpus file overriding the data's own [default: the run's]")
    split: str = option("dev", "dev | test | train | all (the whole file) [default: dev]")
    limit: int = option(0, "score only the first N examples of the split (0 = all)")
    base_url: str | None = option(None, "a running Espalier server (http://host:port/v1) that serves the checkpoint "
                                  "[default: start one]")
    api_key: str | None = option(None, "API key of --base-url's server")
    engine: str | None = option(None, "engine of the started server [default: the run's]")
    model: str | None = option(None, "served model [default: the run's, or the one a program.json names]")
    adapter: str | None = option(None, "fieldwise | prefill | chat [default: the run's; fieldwise outside a run "
                                 "directory]")
    num_docs: int = option(0, "passages per search (0 = the run's; a program outside a run directory: 3)")
    num_hops: int = option(0, "searches per run (0 = the run's; a program outside a run directory: 2)")
    threads: int = option(8, "program runs in flight")
    output: str | None = option(None, "per-example JSONL [default: <run dir>/eval/<checkpoint>-<data>-<split>.jsonl]")


@dataclass(frozen=True)
class EvalTarget:
    manifest: RunManifest
    checkpoint: str
    adapter_dir: Path | None  # the checkpoint's adapter; None for base or when only a server has it
    program_file: Path | None
    home: Path  # where results go by default


def run_eval(opts: EvalOptions) -> tuple[dict, list[ExampleResult]]:
    """Evaluate, print the summary, write the JSONL; returns (summary, per-example results)."""
    import espalier
    from espalier.recipes.multihop import BM25Retriever, ResearchHop
    from espalier.recipes.multihop.job import make_adapter

    if opts.split not in SPLITS:
        raise ValueError(f"--split {opts.split!r}: use one of {', '.join(SPLITS)}")
    target = resolve_target(opts)
    m = target.manifest
    adapter = make_adapter(m.adapter)  # a bad --adapter fails before a server starts
    data = _load(opts, m)
    examples = _split(data, opts.split)[: opts.limit or None]
    logger.info("%d %s examples of %s; %d passages", len(examples), opts.split, opts.data or m.data, len(data.corpus))
    if opts.base_url:
        base_url, api_key = opts.base_url, opts.api_key
    else:
        logger.info("starting the Espalier server (model %s, checkpoint %s)", m.model, target.checkpoint)
        server = espalier.init(model=m.model, engine=opts.engine or m.engine, num_inference_gpus=m.num_inference_gpus,
                               adapter=target.adapter_dir, run_dir=str(target.home / "eval" / "server"))
        base_url, api_key = server["base_url"], server.get("api_key")
    program = ResearchHop(num_docs=m.num_docs, num_hops=m.num_hops, search=BM25Retriever(data.corpus))
    if target.program_file is not None:  # its instructions and demos; its LM is replaced just below
        state = json.loads(target.program_file.read_text())
        program.load_state({k: {**v, "lm": None} if isinstance(v, dict) else v for k, v in state.items()})
    program.set_lm(_lm(m, target.checkpoint, base_url, api_key))
    results = score_examples(program, examples, opts.threads, adapter, desc=f"eval {opts.split}")
    output = Path(opts.output) if opts.output else _default_output(target, opts.data or m.data, opts.split)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text("".join(json.dumps(r.to_dict()) + "\n" for r in results))
    summary = {"checkpoint": target.checkpoint, "data": opts.data or m.data, "split": opts.split,
               "results": str(output), **summarize(results).to_dict()}
    print(format_eval(summary), flush=True)
    return summary, results


def resolve_target(opts: EvalOptions) -> EvalTarget:
    path = Path(opts.target).expanduser().resolve()
    if path.is_dir():
        run_dir, program_file = path, (path / "program.json" if (path / "program.json").exists() else None)
    elif path.is_file():
        run_dir, program_file = (path.parent if (path.parent / MANIFEST_FILE).exists() else None), path
    else:
        raise ValueError(f"{opts.target}: no such run directory or program file")
    saved = _program_checkpoint(program_file) if program_file else None
    if run_dir is None:
        manifest = _standalone_manifest(opts, program_file)
        checkpoint = opts.checkpoint or saved or "base"
        if checkpoint != "base" and not opts.base_url:
            raise ValueError(f"{path} is not in a run directory, so checkpoint {checkpoint!r} has no adapter here: "
                             f"pass --base-url of a server that serves it (`espalier serve --adapter DIR`)")
        return EvalTarget(manifest, checkpoint, None, program_file, path.parent)
    manifest = _overridden(RunManifest.read(run_dir), opts)
    named = [saved, manifest.best_checkpoint] if path.is_file() else [manifest.best_checkpoint, saved]
    checkpoint = opts.checkpoint or next((c for c in named if c), "base")  # a program file: its own checkpoint
    return EvalTarget(manifest, checkpoint, manifest.adapter_dir(run_dir, checkpoint), program_file, run_dir)


def _overridden(m: RunManifest, opts: EvalOptions) -> RunManifest:
    changes = {"model": opts.model, "adapter": opts.adapter, "num_docs": opts.num_docs or None, "num_hops": opts.num_hops or None}
    return replace(m, **{k: v for k, v in changes.items() if v is not None})


def _standalone_manifest(opts: EvalOptions, program_file: Path) -> RunManifest:
    from espalier.recipes.multihop.job import RunOptions

    model = opts.model or _program_model(program_file)
    if not opts.data:
        raise ValueError(f"{program_file} is not in a run directory: pass --data (e.g. synthetic, hotpotqa:PATH)")
    d = RunOptions()
    return RunManifest(model=model, adapter=opts.adapter or d.adapter, data=opts.data, corpus=opts.corpus,
                       seed=d.seed, train_size=0, dev_size=0, num_docs=opts.num_docs or d.num_docs,
                       num_hops=opts.num_hops or d.num_hops, max_tokens=d.max_tokens,
                       val_temperature=d.val_temperature, engine=d.engine, num_inference_gpus=0)


def _program_lm_model(program_file: Path) -> str | None:
    """The LM model a saved program names (`openai/arbor:<model>@<checkpoint>`), if any."""
    state = json.loads(Path(program_file).read_text())
    for value in state.values():
        lm = value.get("lm") if isinstance(value, dict) else None
        if isinstance(lm, dict) and lm.get("model"):
            return lm["model"]
    return None


def _program_checkpoint(program_file: Path) -> str | None:
    model = _program_lm_model(program_file) or ""
    return model.split("@", 1)[1] if "@" in model else None


def _program_model(program_file: Path) -> str:
    model = _program_lm_model(program_file)
    if not model:
        raise ValueError(f"{program_file} names no model: pass --model")
    return model.split("@", 1)[0].removeprefix("openai/").removeprefix("arbor:")


def _load(opts: EvalOptions, m: RunManifest):
    """The data; with the run's seed, and its split sizes when it is the run's own data (so `dev` is its valset)."""
    from espalier.recipes.multihop import load_multihop

    spec, corpus = opts.data or m.data, opts.corpus or (None if opts.data else m.corpus)
    same = spec == m.data and corpus == m.corpus
    sizes = {k: v for k, v in {"train_size": m.train_size, "dev_size": m.dev_size}.items() if v and same}
    return load_multihop(spec, corpus=corpus, seed=m.seed, **sizes)


def _split(data, split: str) -> list[dspy.Example]:
    return data.train + data.dev + data.test if split == "all" else getattr(data, split)


def _lm(m: RunManifest, checkpoint: str, base_url: str, api_key: str | None) -> dspy.LM:
    model = m.model.split("@", 1)[0]
    return dspy.LM(model=f"openai/arbor:{model}@{checkpoint}", api_base=base_url, api_key=api_key or "local",
                   temperature=m.val_temperature, top_p=1.0, top_k=-1, repetition_penalty=1.0,
                   max_tokens=m.max_tokens, num_retries=0, cache=False)


def _default_output(target: EvalTarget, spec: str, split: str) -> Path:
    kind, _, where = spec.partition(":")
    name = f"{kind}-{Path(where).stem}" if where else kind  # hotpotqa:/data/dev.json -> hotpotqa-dev
    slug = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-")[:60] or "data"
    return target.home / "eval" / f"{target.checkpoint}-{slug}-{split}.jsonl"


def format_eval(s: dict) -> str:
    return "\n".join([
        "",
        f"=== espalier eval: checkpoint {s['checkpoint']} on {s['data']} ({s['split']}, {s['num_examples']} examples) ===",
        f"recall:            {100 * s['score']:.1f}%",
        f"format failures:   {100 * s['format_failure_rate']:.1f}%",
        f"other errors:      {100 * s['error_rate']:.1f}%",
        f"per-example:       {s['results']}",
    ])
