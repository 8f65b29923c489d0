"""kill -9 of the user's process during rollouts and during training, then `compile(..., resume=True)`:
the resumed run does exactly the steps that were left, on the examples an uninterrupted run draws, and
returns the best checkpoint of the whole run. (That the trainer's state after a resume equals an
uninterrupted trainer's is tests/inference/test_recovery.py.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import espalier

pytestmark = pytest.mark.slow

SCRIPT = r'''
import json, os, signal, sys, threading
import dspy
from espalier import ArborGRPO, ArborProvider
from espalier.history import steps, validations
from espalier.program.adapter import PrefillChatAdapter

base_url, api_key, model, run_dir, resume, kill_at = sys.argv[1:7]

class Draft(dspy.Module):
    def __init__(self):
        super().__init__()
        self.draft = dspy.Predict("question -> answer")

    def forward(self, question):
        return self.draft(question=question)

def varied(example, pred, trace=None):
    return (sum(map(ord, pred.answer)) % 7) / 6

lm = dspy.LM(model=f"openai/arbor:{model}", provider=ArborProvider(), api_base=base_url, api_key=api_key,
             temperature=1.0, top_p=1.0, top_k=-1, repetition_penalty=1.0, max_tokens=6, num_retries=0)
program = Draft()
program.set_lm(lm)
examples = [dspy.Example(question=f"q {i}?").with_inputs("question") for i in range(7)]
compiler = ArborGRPO(metric=varied, num_dspy_examples_per_grpo_step=2, num_rollouts_per_grpo_step=2,
                     num_train_steps=5, num_steps_for_val=2, num_threads=4, seed=3, run_dir=run_dir,
                     adapter=PrefillChatAdapter(), exclude_demos=True,
                     train_kwargs={"per_device_train_batch_size": 2, "learning_rate": 1e-3})

def on_rollouts(rollouts):
    step = 1 + len(steps(compiler.history))
    print(json.dumps({"step": step, "examples": sorted({r.example_index for r in rollouts})}), flush=True)
    if kill_at == f"rollouts-{step}":
        os.kill(os.getpid(), signal.SIGKILL)

def on_groups(groups):
    step = 1 + len(steps(compiler.history))
    if kill_at == f"training-{step}":  # while the step's request is being trained on
        threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGKILL)).start()

compiler.on_rollouts, compiler.on_groups = on_rollouts, on_groups
with dspy.context(adapter=PrefillChatAdapter()):
    compiled = compiler.compile(program, trainset=examples, valset=examples[:3], resume=resume == "1")
done = [r.step for r in steps(compiler.history)]
vals = [r.step for r in validations(compiler.history)]
print(json.dumps({"steps": done, "vals": vals, "model": compiled.predictors()[0].lm.model}), flush=True)
'''


@pytest.fixture(scope="module")
def server(tiny_llama_factory, tmp_path_factory):
    info = espalier.init(model=str(tiny_llama_factory(seed=0)), engine="transformers",
                         run_dir=tmp_path_factory.mktemp("server"))
    yield info
    from espalier.inference.launch import shutdown

    shutdown()


def run(server, run_dir: Path, resume: bool, kill_at: str = "none") -> tuple[int, list[dict]]:
    args = [server["base_url"], server["api_key"] or "local", server["model"], str(run_dir), "1" if resume else "0",
            kill_at]
    done = subprocess.run([sys.executable, "-c", SCRIPT, *args], capture_output=True, text=True, timeout=600)
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode not in (0, -9):
        raise AssertionError(done.stderr[-4000:])
    return done.returncode, lines


def drawn(lines: list[dict]) -> dict[int, list[int]]:
    return {line["step"]: line["examples"] for line in lines if "step" in line}


@pytest.mark.parametrize("kill_at", ["rollouts-4", "training-3"])
def test_a_killed_compile_resumes_with_the_steps_and_examples_left(server, tmp_path, kill_at):
    code, plain = run(server, tmp_path / "plain", resume=False)
    assert code == 0 and plain[-1]["steps"] == [1, 2, 3, 4, 5] and plain[-1]["vals"] == [0, 2, 4, 5]
    code, killed = run(server, tmp_path / "killed", resume=False, kill_at=kill_at)
    assert code == -9 and "steps" not in killed[-1]
    code, resumed = run(server, tmp_path / "killed", resume=True)
    assert code == 0
    final = resumed[-1]
    assert final["steps"] == [1, 2, 3, 4, 5] and final["vals"] == [0, 2, 4, 5]  # each once: nothing redone twice
    first_redone = min(drawn(resumed))
    assert first_redone == int(kill_at.split("-")[1]) or (kill_at.startswith("training") and first_redone == 4)
    expected = drawn(plain)
    assert {**drawn(killed), **drawn(resumed)} == expected  # the examples of an uninterrupted run
    job = json.loads((tmp_path / "killed" / "compile_state.json").read_text())["job_id"]
    assert final["model"].split("@")[1].startswith(f"{job}/") or final["model"].endswith("@base")
