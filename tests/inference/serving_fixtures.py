"""Serving test helpers: a tiny chat model, random LoRA adapters, an in-process server (module-scoped)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from fake_grpo_trainer import FakeFactory

from espalier.inference.engine import Engine
from espalier.inference.hf_engine import TransformersEngine
from espalier.inference.server import ServerSettings, create_app
from espalier.inference.server_options import ServerOptions
from espalier.inference.serving import ServedModel
from espalier.models import tiny_llama
from espalier.ports import free_port
from espalier.training.protocol import TrainerFactory
from espalier.training.worker import DEFAULT_FACTORY

API_KEY = "test-key"
MODEL_ID = "tiny-chat"


@pytest.fixture(scope="session")
def tiny_chat_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama with the default model's real tokenizer and chat template."""
    return tiny_llama(tmp_path_factory.mktemp("tiny-chat"), seed=0)


def random_adapter(model_dir: Path, out: Path, seed: int, scale: float = 0.5) -> Path:
    """A peft LoRA adapter with random (non-zero) A and B, so it visibly changes outputs."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0, scale)
    peft_model.save_pretrained(out)
    return out


class ServerThread:
    """uvicorn running a FastAPI app on a free loopback port in a daemon thread."""

    def __init__(self, app) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.05)
        raise TimeoutError("test server did not start")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def start_server(model_dir: Path, run_dir: Path, trainer_factory: TrainerFactory = DEFAULT_FACTORY,
                 engine: Engine | None = None) -> tuple[ServedModel, ServerThread]:
    """A server with `engine` (default: the transformers engine) and API key `test-key`, training with
    `trainer_factory`'s trainer."""
    engine = engine if engine is not None else TransformersEngine(model_dir)
    served = ServedModel(engine, MODEL_ID, aliases=(str(model_dir),))
    options = ServerOptions(api_key=API_KEY, max_body_bytes=200_000, request_timeout=300, run_dir=run_dir)
    settings = ServerSettings(options, model_dir, trainer_factory)
    app = create_app(served, settings)
    return served, ServerThread(app)


def stop_server(served: ServedModel, server: ServerThread) -> None:
    job = server.server.config.app.state.job
    if job is not None:
        job.cancel()
    server.stop()
    served.engine.close()


@pytest.fixture(scope="module")
def served_server(tiny_chat_dir: Path,
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServedModel, ServerThread]]:
    """(served model, server thread) of a server whose GRPO jobs use the stand-in trainer (fake_grpo_trainer.py)."""
    served, server = start_server(tiny_chat_dir, tmp_path_factory.mktemp("run"), FakeFactory())
    yield served, server
    stop_server(served, server)


@pytest.fixture(scope="module")
def served_app(served_server: tuple[ServedModel, ServerThread]) -> tuple[ServedModel, str]:
    """(served model, base url) of `served_server`."""
    served, server = served_server
    return served, server.url
