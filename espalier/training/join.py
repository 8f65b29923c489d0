"""A training node that joins the head node's ranks: run under torchrun on every node but the head.

    torchrun --nnodes 2 --nproc-per-node 1 --rdzv-backend c10d --rdzv-endpoint HEAD:29500
             --rdzv-id espalier -m espalier.training.join [--timeout 1800]

The head is the machine of `espalier serve --train-nodes 2 --train-rdzv-endpoint HEAD:29500`; its
job worker hosts the rendezvous when a GRPO job starts. This node's ranks join the process group,
receive the job's `WorkerSpec` from rank 0 (the model path must exist here too), then obey the
commands rank 0 broadcasts (job_worker.rank_main). The ranks exit when the job stops; a job is a
new rendezvous (and so is a restarted trainer worker), so run this command in a loop to serve
successive jobs, whatever each run's exit status (torchrun gives up after about a minute without
a head to join, and exits nonzero when a rank fails):

    while true; do torchrun ... -m espalier.training.join; sleep 2; done

A job refused for its configuration (a "config" error, the client's HTTP 400) exits 0 after
saying why; a failure exits nonzero. Rank 0 saves the trainer state on the head's disk and a
restarted or resumed job loads it on every rank: resuming needs a run directory shared by every
node, at the same path (`espalier serve --run-dir`); a node that cannot see it fails saying so.

Departures from Arbor:
1. Arbor trains on the GPUs of one machine; this lets the trainer's ranks span machines, each
   node started by the standard launcher (torchrun) and found through its c10d rendezvous.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import traceback

from espalier.training.distributed import DEFAULT_TIMEOUT_S


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m espalier.training.join", description=__doc__.splitlines()[0])
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S,
                   help="seconds any collective waits before this rank gives up (a rank elsewhere hung)")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) < 2:
        sys.exit("espalier.training.join: run it under torchrun with --nnodes 2 or more (see its docstring)")
    from espalier.training.worker import rank_main

    try:
        error = rank_main(None, None, args.timeout)
    except Exception as e:  # its message names the rank, numbered from the head's (TorchProcesses)
        traceback.print_exc()
        sys.exit(f"espalier.training.join on {socket.gethostname()} failed: {e}")
    if error is not None and error.kind == "config":  # the job's own error (told to its client): this node is fine
        print(f"espalier.training.join: the job did not start: {error.message}", file=sys.stderr)
    elif error is not None:
        sys.exit(f"espalier.training.join: the job did not start ({error.kind}): {error.message}")


if __name__ == "__main__":
    main()
