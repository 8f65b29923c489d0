"""bf16 against fp32 on this machine, for the three places Espalier chooses a precision.

Side by side in one run: a model-sized matmul (`precision.bf16_speedup`, what `fast_bf16`
decides on), the transformers engine's prefill of one 120-token prompt suffix (SmolLM2-135M,
bf16 autocast against fp32), and GRPOTrainer's optimizer steps (recipe LoRA, 4 sequences of
256 + 48 tokens per step). What `fast_bf16` chose is printed under the table: on AMX or
AVX512-BF16 CPUs and CUDA, bf16; on AVX2-only CPUs, fp32.

    python -m benchmarks.precision
"""

from __future__ import annotations

import time

import torch

from benchmarks.train_throughput import make_groups, trainer_run
from espalier.models import DEFAULT_MODEL, load_causal_lm, materialize_model
from espalier.precision import bf16_speedup, fast_bf16


def prefill_tokens_per_s(model, bf16: bool, tokens: int = 120, reps: int = 3) -> float:
    ids = torch.randint(100, 20000, (1, tokens))

    def once() -> None:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            model(input_ids=ids, logits_to_keep=1)

    once()
    start = time.perf_counter()
    for _ in range(reps):
        once()
    return reps * tokens / (time.perf_counter() - start)


def main() -> None:
    model_dir = materialize_model(DEFAULT_MODEL)
    model = load_causal_lm(model_dir).eval()
    rows = [("matmul (128 x 576 x 1536)", None, None, bf16_speedup("cpu"))]
    fp32, bf16 = prefill_tokens_per_s(model, False), prefill_tokens_per_s(model, True)
    rows.append(("engine prefill, tokens/s", fp32, bf16, bf16 / fp32))
    groups = make_groups(2 * 2 * 3 + 4, 256, 48, model.config.vocab_size)
    fp32, bf16 = trainer_run(model_dir, groups, 2, 2, 2), trainer_run(model_dir, groups, 2, 2, 2, bf16=True)
    rows.append(("GRPOTrainer optimizer steps, tokens/s", fp32, bf16, bf16 / fp32))
    print(f"### [CPU] Precision: bf16 against fp32 ({torch.get_num_threads()} torch threads)\n")
    print("| work | fp32 | bf16 | bf16 speed-up over fp32 |\n| --- | ---: | ---: | ---: |")
    for name, a, b, speedup in rows:
        cells = ["n/a" if x is None else f"{x:.1f}" for x in (a, b)]
        print(f"| {name} | {cells[0]} | {cells[1]} | {speedup:.2f}x |")
    print(f"\n- `fast_bf16('cpu')` on this machine: {fast_bf16('cpu')} (bf16 when the matmul speed-up is >= 1.2x).")


if __name__ == "__main__":
    main()
