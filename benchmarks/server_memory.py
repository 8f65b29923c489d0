"""The server's memory over a long evaluation: many requests with distinct long prompts.

Starts a real server (transformers engine, the default model unless `--model`), sends
`--requests` chat requests whose prompts share nothing beyond the template, `--concurrency`
at a time, and prints the server's resident memory (current and the kernel's peak) every
`--every` requests. What bounds it: the prefix cache's byte budget, the batch cap on rows.

    python -m benchmarks.server_memory [--requests 500] [--words 250] [--concurrency 4]
"""

from __future__ import annotations

import argparse
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from benchmarks.common import standalone_server
from benchmarks.memory import peak_rss_mb

WORDS = ("river castle engine garden silver harbor planet window violin marble forest rocket lantern meadow "
         "falcon copper glacier temple orchard compass thunder velvet canyon beacon ember quartz willow").split()


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def prompt(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) + str(rng.randrange(1000)) for _ in range(words))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    p.add_argument("--requests", type=int, default=500)
    p.add_argument("--words", type=int, default=250)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--every", type=int, default=50)
    args = p.parse_args(argv)

    rng = random.Random(0)
    with standalone_server(args.model) as info:
        pid, url = info["pid"], info["base_url"] + "chat/completions"
        print(f"start: rss {rss_mb(pid):.0f} MiB, peak {peak_rss_mb(pid):.0f} MiB", flush=True)

        def one(text: str) -> int:
            body = {"model": info["model"], "messages": [{"role": "user", "content": text}], "max_tokens": 8}
            return httpx.post(url, json=body, headers={"Authorization": f"Bearer {info['api_key']}"},
                              timeout=600).status_code

        with ThreadPoolExecutor(args.concurrency) as pool:
            for done in range(0, args.requests, args.every):
                codes = list(pool.map(one, [prompt(rng, args.words) for _ in range(args.every)]))
                bad = sum(c != 200 for c in codes)
                print(f"{done + args.every} requests: rss {rss_mb(pid):.0f} MiB, peak {peak_rss_mb(pid):.0f} MiB,"
                      f" non-200 {bad}", flush=True)


if __name__ == "__main__":
    main()
