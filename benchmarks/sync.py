"""Policy sync: from the end of an optimizer step to the engine serving the new policy.

Espalier: `export_adapter` (peft layout, atomic) + `ServedModel.publish` (load the adapter
into the running engine under a fresh name, drop the previous one) + one 1-token request
with the new policy. The alternative a user without adapter hot-loading picks: merge the
LoRA into the base weights (`merge_and_unload`), save the full model, and start a fresh
engine on it (vLLM) or load it into a fresh transformers model, + the same 1-token request.
The trainer and engines run in this process (the engine's own server process for vLLM).
The hot-loads run on the engine the last full reload started (the merged weights as its base:
same shapes, same work), so each engine kind is started once per reload, never just for us.
"""

from __future__ import annotations

import time
from pathlib import Path

from benchmarks.common import Section, Table, fmt, median, ratio
from benchmarks.training import LORA, step_groups
from espalier.inference.engine import GenerateRequest

LIMITS = (
    "Adapter hot-load cost is a small safetensors write plus vLLM's LoRA load; the full reload is dominated by the "
    "fresh engine's start (vLLM) or model load (transformers), measured once per quick run for vLLM."
)


def make_engine(kind: str, model_dir: Path):
    if kind == "vllm":
        from espalier.inference.vllm_engine import VLLMEngine

        return VLLMEngine(model_dir, max_model_len=1024)
    from espalier.inference.hf_engine import TransformersEngine

    return TransformersEngine(model_dir)


def first_token(engine, adapter: str | None) -> None:
    engine.generate(GenerateRequest((1, 2, 3), max_tokens=1, temperature=1.0, adapter=adapter), timeout=600)


def hot_swap(trainer, served, groups, directory: Path) -> dict[str, float]:
    trainer.train_step(groups)  # the optimizer step whose end starts the clock
    start = time.perf_counter()
    adapter = trainer.export_adapter(directory)
    exported = time.perf_counter()
    served.publish(adapter)
    first_token(served.engine, served.policy)
    return {"export_s": exported - start, "total_s": time.perf_counter() - start}


def full_reload(kind: str, model_dir: Path, adapter: Path, directory: Path, keep: bool = False):
    """(timings, the fresh engine when `keep` else None)."""
    from peft import PeftModel

    from espalier.models import load_causal_lm, load_tokenizer

    start = time.perf_counter()
    merged = PeftModel.from_pretrained(load_causal_lm(model_dir), adapter).merge_and_unload()
    merged.save_pretrained(directory, safe_serialization=True)
    load_tokenizer(model_dir).save_pretrained(directory)
    saved = time.perf_counter()
    engine = make_engine(kind, directory)
    try:
        first_token(engine, None)
    finally:
        if not keep:
            engine.close()
    return {"export_s": saved - start, "total_s": time.perf_counter() - start}, engine if keep else None


def run(bench) -> Section:
    from espalier.config import TrainConfig
    from espalier.inference.serving import ServedModel
    from espalier.training import GRPOTrainer

    s, work = bench.sizes, bench.workdir / "sync"
    kwargs = {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 1, "lora_config": LORA, "bf16": True}
    trainer = GRPOTrainer(bench.model_dir, TrainConfig.from_kwargs(kwargs))
    tiny = type(s)(batch=2, accum=1, prompt_len=32, completion_len=8)
    groups = step_groups(tiny, trainer.model.config.vocab_size, s.reps + 2)
    runs = {}
    for kind in bench.engines:
        trainer.train_step(groups[:1])
        adapter = trainer.export_adapter(work / f"{kind}-first")
        count = s.full_reload_reps if kind == "vllm" else s.reps  # a fresh vLLM takes tens of seconds
        reloads, engine = [], None
        for i in range(count):
            timing, engine = full_reload(kind, bench.model_dir, adapter, work / f"{kind}-full-{i}", keep=i == count - 1)
            reloads.append(timing)
        served = ServedModel(engine, "bench")
        try:
            swaps = [hot_swap(trainer, served, [g], work / f"{kind}-hot-{i}") for i, g in enumerate(groups[1:])][1:]
        finally:
            engine.close()
        runs[f"Espalier: export adapter + hot-load into the running {kind} engine"] = _summary(swaps)
        fresh = "engine" if kind == "vllm" else "model"
        runs[f"merge LoRA + save full model + fresh {kind} {fresh}"] = _summary(reloads)
    names = list(runs)
    rows = [[n, fmt(1000 * r["total_s"], 0), fmt(1000 * r["export_s"], 0), str(r["n"]),
             "1.00x" if i % 2 == 0 else ratio(r["total_s"], runs[names[i - 1]]["total_s"])]
            for i, (n, r) in enumerate(runs.items())]
    table = Table(
        "Policy sync: end of an optimizer step -> the engine answers with the new policy",
        ["path", "total ms", "of which export / merge + save ms", "repetitions", "slower than hot-load"],
        rows,
        ["Total includes one 1-token request with the new policy. Median over the repetitions shown "
         "(the first hot-load is a warm-up and not counted)."],
    )
    return Section("sync", [table], {"runs": runs}, limits=LIMITS)


def _summary(samples: list[dict[str, float]]) -> dict[str, float]:
    return {"total_s": median([x["total_s"] for x in samples]), "export_s": median([x["export_s"] for x in samples]),
            "n": len(samples), "samples_total_s": [x["total_s"] for x in samples]}
