"""arbor-ai 0.2.17's own client code (`ArborProvider`, `ArborGRPO` from `arbor.integrations.dspy`) drives an
Espalier server: initialize, steps, a checkpoint at a validation improvement, terminate.

`pip install --no-deps arbor-ai==0.2.17` (the Makefile's install target) installs the package without its
dependencies (vLLM 0.10, deepspeed, ...). Its `arbor/__init__.py` imports `arbor.client`, which pulls in vLLM
through the CLI, so `arbor_integrations()` registers a bare `arbor` package object (its `__path__` is the installed
directory; its `__init__` never runs) and imports `arbor.integrations.dspy` under it: the integration modules run
unchanged and only import dspy, openai and requests.
"""

from __future__ import annotations

import importlib.util
import itertools
import sys
import types

import dspy
import pytest
import requests

import espalier
from espalier.inference.launch import shutdown
from espalier.program.adapter import PrefillChatAdapter

pytestmark = pytest.mark.slow

TRAIN_KWARGS = {  # what an Arbor user passes, with the one change a CPU machine needs: num_training_gpus=0
    "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1, "learning_rate": 1e-3,
    "temperature": 1.0, "top_k": -1, "top_p": 1.0, "repetition_penalty": 1.0, "beta": 0.0,
    "lora_config": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
    "num_training_gpus": 0, "num_inference_gpus": 0, "max_steps": 100,
}


def arbor_integrations() -> types.ModuleType:
    """`arbor.integrations.dspy`, imported without running `arbor/__init__.py` (see the module docstring)."""
    if "arbor" not in sys.modules:
        spec = importlib.util.find_spec("arbor")  # locates the installed package; executes nothing
        assert spec is not None, "arbor-ai is not installed: `make install` runs pip install --no-deps arbor-ai==0.2.17"
        package = types.ModuleType("arbor")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["arbor"] = package
    import arbor.integrations.dspy as integration

    return integration


@pytest.fixture(scope="module")
def server(tiny_llama_factory, tmp_path_factory):
    model_dir = tiny_llama_factory(seed=0)  # the default model's tokenizer and chat template
    run_dir = tmp_path_factory.mktemp("arbor-server")
    with pytest.MonkeyPatch.context() as env:
        env.delenv("OPENAI_API_KEY", raising=False)  # an Arbor user sets no key: init() supplies what the LM sends
        info = espalier.init(model=str(model_dir), engine="transformers", run_dir=run_dir, record_trained=True)
        yield {**info, "run_dir": run_dir}
        shutdown()


def _lm(server, provider) -> dspy.LM:
    return dspy.LM(model=f"openai/arbor:{server['model']}", provider=provider, api_base=server["base_url"],
                   temperature=1.0, top_p=1.0, top_k=-1, repetition_penalty=1.0, max_tokens=8)


def _status(server, job_id: str) -> dict:
    return requests.post(f"{server['base_url']}fine_tuning/grpo/status", json={"job_id": job_id}, timeout=60).json()


def test_arbors_own_grpo_compiles_against_espalier(server, monkeypatch):
    arbor = arbor_integrations()
    lm = _lm(server, arbor.ArborProvider())
    program = dspy.Predict("question -> answer")
    program.set_lm(lm)
    validations = itertools.count()

    def metric(example, pred, trace=None) -> float:
        if trace is None:  # validation (Evaluate): a score that rises, so step 1 is an improvement
            return min(next(validations), 10) / 10
        return float(len(getattr(pred, "answer", "") or "") % 2)

    trainset = [dspy.Example(question=f"q {i}?", answer="a").with_inputs("question") for i in range(2)]
    valset = [dspy.Example(question=f"v {i}?", answer="a").with_inputs("question") for i in range(2)]
    compiler = arbor.ArborGRPO(metric=metric, num_dspy_examples_per_grpo_step=1, num_rollouts_per_grpo_step=2,
                               num_train_steps=2, num_steps_for_val=1, num_threads=2, exclude_demos=True,
                               train_kwargs=dict(TRAIN_KWARGS), checkpoint="single-best")
    jobs = []
    original = arbor.ArborProvider().ReinforceJob.initialize

    def initialize(job):  # only to learn the job object; the client's own initialize runs
        jobs.append(job)
        return original(job)

    monkeypatch.setattr(arbor.arbor_provider.ArborReinforceJob, "initialize", initialize)
    # A random tiny model never writes DSPy's format; with the first header prefilled every rollout parses, so
    # Arbor's GRPO has groups to send (it drops runs whose trace is empty). The adapter is the user's choice here.
    with dspy.context(adapter=PrefillChatAdapter()):
        compiler.compile(student=program, trainset=trainset, valset=valset)

    (job,) = jobs
    status = _status(server, job.provider_job_id)
    assert status["status"] == "terminated" and status["steps"] == 2 and status["optimizer_steps"] >= 2
    # The client's checkpoint record is the server's, in Arbor's shape (it used to crash on a bare path).
    record = job.checkpoints["model_checkpoint_best"]
    assert record["checkpoint_name"] == "model_checkpoint_best" and record["score"] > 0
    assert record["checkpoint_dir"].endswith(f"checkpoints/{job.provider_job_id}/model_checkpoint_best")
    assert record["metadata"]["score"] == record["score"]
    assert status["checkpoints"]["model_checkpoint_best"]["model"] == (
        f"{server['model']}@{job.provider_job_id}/model_checkpoint_best")
    assert compiler.best_validation_step >= 0  # the improvement happened after training started
    served = lm.copy(model=f"openai/arbor:{status['checkpoints']['model_checkpoint_best']['model']}")
    assert isinstance(served("hi")[0], str)  # the checkpoint is served under its job's name


def test_arbors_default_gpu_count_is_a_clear_400_on_a_cpu_machine(server):
    arbor = arbor_integrations()
    lm = _lm(server, arbor.ArborProvider())
    kwargs = {k: v for k, v in TRAIN_KWARGS.items() if k != "num_training_gpus"} | {"num_generations": 2}
    job = arbor.arbor_provider.ArborReinforceJob(lm, kwargs)
    with pytest.raises(requests.HTTPError) as err:
        job.initialize()  # Arbor's default num_training_gpus=1
    assert err.value.response.status_code == 400
    assert "num_training_gpus" in err.value.response.json()["error"]["message"]
