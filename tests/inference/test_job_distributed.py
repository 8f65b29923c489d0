"""A GRPO job on several trainer ranks (CPU, gloo, `--train-processes`) trains what one process trains.

Also: a rank that dies fails the job instead of hanging it, and a GPU count this CPU machine
cannot give is a 400 that names the fix.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file

from espalier.config import TrainConfig
from espalier.types import Group, Sample

# serving_fixtures is imported where used: the ranks import this module for DyingTrainer, and it is heavy
MODEL_ID = "tiny-chat"  # serving_fixtures.MODEL_ID
GRPO = "/v1/fine_tuning/grpo"
TRAINER_CONFIG = {
    "learning_rate": 1e-2, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2, "seed": 3,
    "lora_config": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
}
# 4 sequences: one optimizer batch on one process (2 x 2) and on two (2 x 2 x 2), so the updates are equal
GROUPS = [
    Group((Sample((1, 2, 3), (40, 41, 42), 1.0), Sample((1, 2, 3), (43, 44), 0.0)), key="a"),
    Group((Sample((5, 6), (50, 51), 0.2), Sample((5, 6), (52, 53, 54, 55), 0.9)), key="b"),
]


class DyingTrainer:
    """Rank 1 dies in its first step; pickled by reference into the ranks, so it must stay module-level."""

    def __init__(self, model_path: Path, config, device: str, processes=None, on_fed=None) -> None:
        self.rank = 0 if processes is None else processes.rank

    def train_step(self, groups):
        if self.rank == 1:
            os._exit(3)
        time.sleep(600)  # rank 0 would wait in a collective; the launcher must end it


def configure(app, **options) -> None:
    """Change the server's options (ServerOptions fields) for the next initialize."""
    app.state.settings.options = replace(app.state.settings.options, **options)


def post(url: str, route: str, body: dict) -> httpx.Response:
    from serving_fixtures import API_KEY

    return httpx.post(f"{url}{GRPO}/{route}", json=body, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=300)


@pytest.fixture(scope="module")
def server(tiny_chat_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple]:
    """(app, base url, run dir) of a server with the real trainer."""
    from serving_fixtures import start_server, stop_server

    run_dir = tmp_path_factory.mktemp("run")
    served, thread = start_server(tiny_chat_dir, run_dir)
    yield thread.server.config.app, thread.url, run_dir
    stop_server(served, thread)


def _train_one_step(app, url: str, run_dir: Path, processes: int) -> dict[str, torch.Tensor]:
    # rank r > 0 records its share to step-N.rank<r>.jsonl
    configure(app, train_processes=processes, record_trained=processes > 1)
    r = post(url, "initialize", {"model": MODEL_ID, "trainer_config": TRAINER_CONFIG})
    assert r.status_code == 200, r.text
    job_id = r.json()["job_id"]
    r = post(url, "step", {"job_id": job_id, "groups": [g.to_dict() for g in GROUPS]})
    assert r.status_code == 200, r.text
    status = r.json()
    assert status["steps"] == 1 and status["optimizer_steps"] == 1 and status["last_swap_ms"] is not None
    assert status["metrics"][0]["num_sequences"] == 4
    weights = load_file(run_dir / "adapters" / job_id / "step-00001" / "adapter_model.safetensors")  # per job
    assert post(url, "terminate", {"job_id": job_id}).json()["status"] == "terminated"
    return weights


@pytest.mark.slow
def test_two_cpu_ranks_publish_the_adapter_one_process_trains(server):
    app, url, run_dir = server
    two = _train_one_step(app, url, run_dir, 2)
    shares = [len((run_dir / "trained" / name).read_text().splitlines())
              for name in ("step-00001.jsonl", "step-00001.rank1.jsonl")]
    assert shares == [2, 2]  # each rank fed half of the batch
    one = _train_one_step(app, url, run_dir, 0)
    assert two.keys() == one.keys() and any(t.abs().max() > 0 for t in one.values())
    for name in one:
        torch.testing.assert_close(two[name], one[name], atol=1e-5, rtol=0)
    configure(app, record_trained=False)


@pytest.mark.slow
def test_a_dying_rank_is_restarted_then_fails_the_job(server):
    """Rank 1 dies in every step: each death ends all ranks (no hang in a collective), the ranks are started
    again with a retryable 503, and after MAX_RESTARTS the job fails."""
    from espalier.inference.job import MAX_RESTARTS
    from espalier.training.worker import DEFAULT_FACTORY

    app, url, _ = server
    configure(app, train_processes=2)
    app.state.settings.trainer_factory = DyingTrainer
    try:
        job_id = post(url, "initialize", {"model": MODEL_ID}).json()["job_id"]
        for restart in range(1, MAX_RESTARTS + 1):
            r = post(url, "step", {"job_id": job_id, "groups": [g.to_dict() for g in GROUPS]})
            assert r.status_code == 503 and "retry" in r.json()["error"]["message"]
            assert post(url, "status", {"job_id": job_id}).json()["trainer_restarts"] == restart
        r = post(url, "step", {"job_id": job_id, "groups": [g.to_dict() for g in GROUPS]})
        assert r.status_code == 500 and "trainer process died" in r.json()["error"]["message"]
        assert post(url, "status", {"job_id": job_id}).json()["status"] == "failed"
    finally:
        app.state.settings.trainer_factory = DEFAULT_FACTORY
        configure(app, train_processes=0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer of a machine without CUDA")
def test_gpus_this_machine_lacks_are_a_400_naming_the_fix(server):
    app, url, _ = server
    for train_processes in (0, 2):
        configure(app, train_processes=train_processes)
        r = post(url, "initialize", {"model": MODEL_ID, "trainer_config": {"num_training_gpus": 1}})
        assert r.status_code == 400, r.text
        assert "set it to" in r.json()["error"]["message"] and "num_training_gpus" in r.json()["error"]["message"]
    configure(app, train_processes=0)
    r = post(url, "initialize", {"model": MODEL_ID, "gpu_config": {"multi": {"num_training_gpus": 2}}})
    assert r.status_code == 400 and "0 = CPU" in r.json()["error"]["message"]
    assert app.state.job is None or app.state.job.state.status != "running"


def test_placement_follows_the_device_plan():
    from espalier.inference.job import JobError, training_placement
    from espalier.inference.server_options import parse_server_options

    gpus = TrainConfig.from_kwargs
    assert training_placement(TrainConfig(), available=0) == ("cpu", 1, None)
    assert training_placement(gpus({"num_training_gpus": 1, "num_inference_gpus": 1}), available=2) == ("cuda:1", 1, None)
    assert training_placement(gpus({"num_training_gpus": 2, "num_inference_gpus": 1}), available=4) == ("cuda", 2, "1,2")
    assert training_placement(TrainConfig(), train_processes=2, available=4) == ("cpu", 2, "")  # CPU ranks see no GPU
    with pytest.raises(JobError, match="at most 4"):
        training_placement(gpus({"num_training_gpus": 5}), available=4)
    assert parse_server_options(["--train-processes", "2"]).train_processes == 2
