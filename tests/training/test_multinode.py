"""Training ranks on two nodes (simulated on this machine): the server side's job worker hosts torchrun's c10d
rendezvous as the head, a real `torchrun --nnodes 2 ... -m espalier.training.join` joins it; CPU, gloo, loopback.

1. Two steps on the two nodes export the adapter one process trains on the same batches.
2. A rank killed (SIGKILL) on either node makes the other node's rank fail fast with a message that says so,
   long before the collective timeout.
3. Ranks left idle longer than a short collective timeout still train: rank 0's heartbeat follows the timeout.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from espalier.config import TrainConfig
from espalier.ports import free_port
from espalier.training import GRPOTrainer
from espalier.training.distributed import DEFAULT_TIMEOUT_S, TrainNodes
from espalier.training.protocol import (
    Ready,
    ResumeCommand,
    StepCommand,
    StepDone,
    StopCommand,
    Stopped,
    WorkerError,
    WorkerSpec,
    receive_reply,
    send,
)
from espalier.training.worker import DEFAULT_FACTORY, HEARTBEAT_S, _missing_state, heartbeat_s, worker_main
from espalier.types import Group, Sample

TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
TIMEOUT_S = 30.0  # every collective of these tests unless one says otherwise
RDZV_TIMEOUT_S = 30.0  # how long the head waits for the joining node
KWARGS = {
    "learning_rate": 1e-2, "gradient_accumulation_steps": 2, "loss_type": "dapo", "seed": 5,
    "lora_config": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
}
GROUPS = (
    Group(tuple(Sample((4, 5, 6 + i), tuple(range(10 + i, 13 + 2 * i)), float(i % 3)) for i in range(5))),
    Group(tuple(Sample((7, 8), tuple(range(20, 22 + i)), float(i % 2)) for i in range(5))),
)


HEAD = "127.0.0.2"  # the head's address; the joining node's 127.0.0.1 sorts first, so the rendezvous makes
# the joining node torch's global rank 0 (it orders nodes by address and ignores --node-rank): rank 0 must still be
# the head's rank, the one that talks to the job and writes the adapter


def _join_node(port: int, log: Path, timeout_s: float) -> subprocess.Popen:
    """Node 1: the command a user runs on the other machine (is_host=0: on one machine, never host the store)."""
    command = [TORCHRUN, "--nnodes", "2", "--node-rank", "1", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
               "--rdzv-endpoint", f"{HEAD}:{port}", "--rdzv-id", "espalier", "--rdzv-conf", "is_host=0",
               "--local-addr", "127.0.0.1", "-m", "espalier.training.join", "--timeout", str(timeout_s)]
    env = os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "LOGLEVEL": "INFO"}  # INFO: its global ranks
    return subprocess.Popen(command, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)


def _head_node(model_dir: Path, port: int, timeout_s: float, log_dir: Path):
    """Node 0: the job worker the server starts, as a GRPO job does (job.py), with one rank on this node."""
    nodes = TrainNodes(f"{HEAD}:{port}", 2, join_timeout_s=RDZV_TIMEOUT_S, timeout_s=timeout_s, log_dir=log_dir)
    spec = WorkerSpec(DEFAULT_FACTORY, model_dir, TrainConfig.from_kwargs(KWARGS | {"per_device_train_batch_size": 2}),
                      nodes=nodes)
    ctx = mp.get_context("spawn")
    conn, child = ctx.Pipe()
    proc = ctx.Process(target=worker_main, args=(child, spec), daemon=True)
    proc.start()
    child.close()
    return conn, proc


def _reply(conn, timeout: float = 120.0):
    assert conn.poll(timeout), "no reply from the head's rank 0"
    return receive_reply(conn)


def _start_two_nodes(model_dir: Path, tmp_path: Path, timeout_s: float = TIMEOUT_S):
    port = free_port()
    joined = _join_node(port, tmp_path / "join.log", timeout_s)
    conn, head = _head_node(model_dir, port, timeout_s, tmp_path / "torchelastic")
    assert isinstance(_reply(conn), Ready), (tmp_path / "join.log").read_text()
    return conn, head, joined


def _rank_process(parent_pid: int) -> psutil.Process:
    """The training rank under a launcher (torchrun's agent): its one python child that is not a resource tracker."""
    children = [p for p in psutil.Process(parent_pid).children(recursive=True)
                if "resource_tracker" not in " ".join(p.cmdline())]
    assert len(children) == 1, [p.cmdline() for p in children]
    return children[0]


def _step(step: int, tmp_path: Path) -> StepCommand:
    return StepCommand(step, GROUPS, tmp_path / f"adapter-{step}", tmp_path / f"state-{step}")


@pytest.mark.slow
def test_two_nodes_export_the_adapter_one_process_trains(tiny_llama_dir: Path, tmp_path: Path) -> None:
    conn, head, joined = _start_two_nodes(tiny_llama_dir, tmp_path)
    try:
        for step in (1, 2):
            send(conn, _step(step, tmp_path))
            reply = _reply(conn)
            assert isinstance(reply, StepDone), reply
        send(conn, StopCommand())
        assert isinstance(_reply(conn), Stopped)
        head.join(60)
        assert head.exitcode == 0 and joined.wait(60) == 0
    finally:
        head.kill()
        joined.kill()
    assert "global_ranks=[0]" in (tmp_path / "join.log").read_text()  # the head was not torch's rank 0
    assert any((tmp_path / "torchelastic").iterdir())  # the agent's logs are under the run directory, not /tmp
    assert reply.optimizer_steps == 4  # 10 sequences a step, optimizer batches of 2 x 2 x 2 = 8: 8 then 2

    single = GRPOTrainer(tiny_llama_dir, TrainConfig.from_kwargs(KWARGS | {"per_device_train_batch_size": 4}))
    for _ in (1, 2):
        single.train_step(list(GROUPS))  # the same optimizer batches of 8 then 2, on one process
    one = load_file(Path(single.export_adapter(tmp_path / "single")) / "adapter_model.safetensors")
    two = load_file(reply.adapter / "adapter_model.safetensors")
    assert two.keys() == one.keys() and all(t.abs().max() > 0 for k, t in one.items() if "lora_B" in k)
    for name in one:
        torch.testing.assert_close(two[name], one[name], atol=1e-6, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("victim", ["joined", "head"])
def test_a_killed_rank_fails_the_other_node_fast_and_clearly(tiny_llama_dir: Path, tmp_path: Path,
                                                              victim: str) -> None:
    fast = 20.0  # the peer's death is seen at once; a collective would time out only after 180 s
    conn, head, joined = _start_two_nodes(tiny_llama_dir, tmp_path, timeout_s=180.0)
    try:
        _rank_process(joined.pid if victim == "joined" else head.pid).send_signal(signal.SIGKILL)
        killed = time.monotonic()
        if victim == "joined":  # the head's rank 0 notices when it next broadcasts: this command
            send(conn, _step(1, tmp_path))
            reply = _reply(conn, fast)
            assert isinstance(reply, WorkerError) and "lost the other training ranks" in reply.message, reply
            message = reply.message
            head.join(fast)
            assert head.exitcode not in (0, None)  # the job sees its worker die and restarts it or fails
        else:  # the joining node's rank waits in the broadcast of the next command or heartbeat
            assert joined.wait(fast) != 0
            message = (tmp_path / "join.log").read_text()
            assert "espalier.training.join on" in message and "lost the other training ranks" in message, message
        assert time.monotonic() - killed < fast
        assert "timed out" not in message.lower(), message  # the peer's death, not a collective's timeout
    finally:
        head.kill()
        joined.kill()


@pytest.mark.slow
def test_idle_ranks_outlive_a_collective_timeout_shorter_than_the_heartbeat(tiny_llama_dir: Path,
                                                                            tmp_path: Path) -> None:
    timeout_s = 8.0  # under HEARTBEAT_S: rank 0 must beat every timeout_s / 4
    conn, head, joined = _start_two_nodes(tiny_llama_dir, tmp_path, timeout_s)
    try:
        time.sleep(1.5 * timeout_s)  # the server sends nothing (rollouts take long)
        assert joined.poll() is None, (tmp_path / "join.log").read_text()
        send(conn, _step(1, tmp_path))
        assert isinstance(_reply(conn), StepDone), (tmp_path / "join.log").read_text()
        send(conn, StopCommand())
        assert isinstance(_reply(conn), Stopped)
        head.join(60)
        assert head.exitcode == 0 and joined.wait(60) == 0
    finally:
        head.kill()
        joined.kill()


def test_the_heartbeat_stays_within_any_collective_timeout() -> None:
    assert heartbeat_s(DEFAULT_TIMEOUT_S) == HEARTBEAT_S == 60.0
    assert heartbeat_s(8.0) == 2.0


def test_a_rank_without_the_saved_state_names_the_shared_run_directory(tmp_path: Path) -> None:
    class TwoNodes:  # rank 0 on this machine sees tmp_path; rank 1's node does not
        def gather_objects(self, obj):
            return [obj, ("node-b", False)]

    error = _missing_state(ResumeCommand(tmp_path), TwoNodes())
    assert error is not None and error.kind == "config" and error.message.startswith(f"node-b (rank 1) cannot find the trainer state at "
                                                               f"{tmp_path}")
    assert "run directory shared by every training node" in error.message


@pytest.mark.parametrize(("kind", "exits"), [("config", False), ("trainer", True)])
def test_join_exits_0_when_the_job_is_refused_for_its_config(monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture, kind: str,
                                                            exits: bool) -> None:
    """A client's bad train_kwargs is the job's error, not this node's: the node's loop goes on quietly."""
    from espalier.training import join
    from espalier.training import worker as job_worker

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(job_worker, "rank_main", lambda *args: WorkerError(kind, "learning_rate must be positive"))
    if exits:
        with pytest.raises(SystemExit, match="did not start \\(trainer\\)"):
            join.main([])
    else:
        join.main([])
        assert "the job did not start: learning_rate must be positive" in capsys.readouterr().err


def test_node_flags_are_checked_and_name_the_fix() -> None:
    from espalier.inference.server_options import parse_server_options

    def nodes(*argv: str) -> TrainNodes | None:
        return parse_server_options(list(argv)).nodes()

    assert nodes() is None
    assert nodes("--train-nodes", "3", "--train-rdzv-endpoint", "10.0.0.1:29500") == TrainNodes("10.0.0.1:29500", 3)
    for argv, fix in [(("--train-nodes", "2"), "needs --train-rdzv-endpoint"),
                      (("--train-rdzv-endpoint", "10.0.0.1:29500"), "--train-nodes 2 or more"),
                      (("--train-nodes", "2", "--train-rdzv-endpoint", "10.0.0.1"), "is not HOST:PORT")]:
        with pytest.raises(ValueError, match=fix):
            nodes(*argv)
