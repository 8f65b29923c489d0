"""What a kill -9 of the trainer worker costs a GRPO job: the step after it, against an ordinary step.

Starts a real server (transformers engine, the default model unless `--model`), initialises a
job with the recipe's LoRA, trains `--steps` steps of one group of G sequences, and after
the second step kills the trainer worker with SIGKILL. The next step restarts the worker from
the last step's saved state; the client retries once on the 503 it may get (as ArborGRPO
does). Prints each step's seconds and HTTP answers.

    python -m benchmarks.recovery [--steps 4] [--group 6] [--tokens 64]
"""

from __future__ import annotations

import argparse
import os
import signal
import time

import httpx
import psutil

from benchmarks.common import standalone_server


def group(step: int, size: int, tokens: int) -> dict:
    samples = [{"prompt_ids": list(range(100, 400)), "completion_ids": [(500 + 7 * i + step + j) % 40000
                for j in range(tokens)], "reward": float(i % 2)} for i in range(size)]
    return {"key": f"step{step}", "samples": samples}


def kill_trainer(server_pid: int) -> None:
    """SIGKILL the server's trainer worker and wait until it is gone."""
    [worker] = [c for c in psutil.Process(server_pid).children() if "resource_tracker" not in " ".join(c.cmdline())]
    os.kill(worker.pid, signal.SIGKILL)
    psutil.wait_procs([worker], timeout=10)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--group", type=int, default=6)
    p.add_argument("--tokens", type=int, default=64)
    args = p.parse_args(argv)

    with standalone_server(args.model) as info:
        headers = {"Authorization": f"Bearer {info['api_key']}"}
        url = info["base_url"] + "fine_tuning/grpo/"
        config = {"learning_rate": 1e-4, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 3}
        r = httpx.post(url + "initialize", json={"model": info["model"], "trainer_config": config},
                       headers=headers, timeout=900)
        r.raise_for_status()
        for step in range(args.steps):
            if step == 2:
                kill_trainer(info["pid"])
            start, codes = time.perf_counter(), []
            while not codes or codes[-1] == 503:
                body = {"groups": [group(step, args.group, args.tokens)]}
                codes.append(httpx.post(url + "step", json=body, headers=headers, timeout=900).status_code)
            status = httpx.post(url + "status", json={}, headers=headers, timeout=60).json()
            print(f"step {step + 1}: {time.perf_counter() - start:.1f} s, answers {codes}, "
                  f"trainer restarts {status['trainer_restarts']}", flush=True)


if __name__ == "__main__":
    main()
