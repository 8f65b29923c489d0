"""`ArborProvider`: the DSPy provider for an Espalier server, and its GRPO `ReinforceJob`.

    lm = dspy.LM("openai/arbor:<model id>", provider=ArborProvider(), api_base=info["base_url"])
    job = lm.reinforce(train_kwargs)      # POST /v1/fine_tuning/grpo/initialize
    job.step(train_data=[{"batch_id": 0, "group": [...]}], train_data_format="grpo_chat")
    job.step_groups([espalier.types.Group, ...])   # Espalier: token ids cross unchanged

The job speaks the server's `/v1/fine_tuning/grpo/*` routes over HTTP, with a timeout on
every call, and turns an error answer into `GRPOJobError` carrying the server's message.

Departures from DSPy's `ArborProvider` / `ArborReinforceJob`:
1. Every request has a timeout and sends the LM's API key; a failed call raises with the
   server's reason instead of an `assert` on the status code.
2. `step` sends all groups in one request and returns when the new policy is served; the
   LM keeps its model name, which always means "the current policy" on the server.
3. `step_groups` (Espalier's extension) sends `espalier.types.Group`s with the sampled
   token ids and log-probs, so nothing is re-tokenised.
4. `save_checkpoint` makes the checkpoint servable as `<id>@<job_id>/<name>`, a name no other
   job reuses (see `checkpoint_model`).
5. `ArborProvider()` sets `OPENAI_API_KEY` when unset (`launch.default_client_key`), so the
   recipe's `dspy.LM(...)` without an `api_key` reaches a server that has none; the job's
   requests send the LM's key, else that variable.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import dspy
import httpx
from dspy.clients.provider import ReinforceJob
from dspy.clients.utils_finetune import TrainDataFormat

from espalier.inference.launch import default_client_key
from espalier.types import Group, JobStatus

PREFIX = "openai/arbor:"


class GRPOJobError(RuntimeError):
    """The server refused or failed a GRPO job request; the message is the server's."""

    def __init__(self, message: str, status_code: int | None = None):
        super().__init__(message)
        self.status_code = status_code


def model_id(model: str) -> str:
    for prefix in ("openai/", "arbor:"):
        if model.startswith(prefix):
            model = model[len(prefix) :]
    return model


class ArborReinforceJob(ReinforceJob):
    """A GRPO job on an Espalier (or Arbor) server."""

    timeouts = {"initialize": 1800.0, "step": 7200.0, "checkpoint": 600.0, "default": 120.0}

    def __init__(self, lm: dspy.LM, train_kwargs: dict[str, Any] | None = None):
        super().__init__(lm=lm, train_kwargs=dict(train_kwargs or {}))
        self.job_id: str | None = None
        self.last_status: dict[str, Any] = {}

    # ---- HTTP --------------------------------------------------------------------------

    def _url(self, route: str) -> str:
        base = self.lm.kwargs.get("api_base")
        if not base:
            raise ValueError("the LM has no api_base: dspy.LM(..., api_base=espalier.init()['base_url'])")
        return f"{str(base).rstrip('/')}/fine_tuning/grpo/{route}"

    def _post(self, route: str, body: dict[str, Any]) -> dict[str, Any]:
        headers = {}
        key = self.lm.kwargs.get("api_key") or os.environ.get("OPENAI_API_KEY")
        if key:
            headers["Authorization"] = f"Bearer {key}"
        timeout = self.timeouts.get(route, self.timeouts["default"])
        try:
            response = httpx.post(self._url(route), json=body, headers=headers, timeout=timeout)
        except httpx.TimeoutException as e:
            raise GRPOJobError(f"GRPO {route} got no answer within {timeout:.0f} s") from e
        except httpx.HTTPError as e:
            raise GRPOJobError(f"GRPO {route} failed: {e}") from e
        if response.status_code != 200:
            try:
                message = response.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = response.text[:2000]
            raise GRPOJobError(f"GRPO {route} failed ({response.status_code}): {message}", response.status_code)
        self.last_status = response.json()
        return self.last_status

    def _body(self, **fields: Any) -> dict[str, Any]:
        return {"job_id": self.job_id, "model": model_id(self.lm.model), **fields}

    # ---- the job API -------------------------------------------------------------------

    def initialize(self) -> dict[str, Any]:
        status = self._post("initialize", {"model": model_id(self.lm.model), "trainer_config": self.train_kwargs})
        self.job_id = status["job_id"]
        return status

    def step(
        self, train_data: list[dict[str, Any]], train_data_format: TrainDataFormat | str | None = None
    ) -> dict[str, Any]:
        if train_data_format not in (None, TrainDataFormat.GRPO_CHAT, TrainDataFormat.GRPO_CHAT.value):
            raise ValueError(f"GRPO steps take the grpo_chat format, got {train_data_format!r}")
        return self._post("step", self._body(batch=train_data))

    def step_groups(self, groups: Sequence[Group]) -> JobStatus:
        """Train on `espalier.types.Group`s with their exact token ids; returns the job status."""
        if not groups:
            raise ValueError("step_groups needs at least one group")
        return JobStatus.from_dict(self._post("step", self._body(groups=[g.to_dict() for g in groups])))

    def get_status(self) -> dict[str, Any]:
        return self._post("status", self._body())

    def status(self) -> str | None:
        return self.get_status().get("status")

    def resume(self, job_id: str, step: int) -> dict[str, Any]:
        """Espalier's extension: go on with job `job_id` (same id, same checkpoints) from the trainer state the
        server saved after GRPO step `step`; the server must use the same run directory as before."""
        body = {"model": model_id(self.lm.model), "trainer_config": self.train_kwargs, "resume_job": job_id,
                "resume_step": step}
        status = self._post("initialize", body)
        self.job_id = status["job_id"]
        for name, record in status["checkpoints"].items():
            self._remember(name, record, None)
        return status

    def save_checkpoint(self, checkpoint_name: str, score: float | None = None) -> dict[str, Any]:
        status = self._post("checkpoint", self._body(checkpoint_name=checkpoint_name))
        self._remember(checkpoint_name, status["checkpoints"][checkpoint_name], score)
        self.last_checkpoint = checkpoint_name
        return status

    def _remember(self, name: str, record: dict[str, Any], score: float | None) -> None:
        """Arbor's record, plus the name that serves it."""
        self.checkpoints[name] = {**record, "path": record["checkpoint_dir"], "score": score,
                                  "model": f"{PREFIX}{record['model']}"}

    def checkpoint_model(self, checkpoint_name: str) -> str:
        """The LM model name that serves a checkpoint this job saved (`<id>@<job_id>/<name>`), or `<id>@base`."""
        if checkpoint_name in self.checkpoints:
            return self.checkpoints[checkpoint_name]["model"]
        if checkpoint_name != "base":
            raise KeyError(f"this job saved no checkpoint {checkpoint_name!r}; saved: {sorted(self.checkpoints)}")
        return f"{PREFIX}{model_id(self.lm.model).partition('@')[0]}@base"

    def cancel(self) -> dict[str, Any]:
        return self._post("cancel", self._body())

    def terminate(self) -> dict[str, Any]:
        return self._post("terminate", self._body())


class ArborProvider(dspy.Provider):
    """DSPy provider for models served by Espalier (`openai/arbor:<id>`): reinforceable, not finetunable."""

    def __init__(self) -> None:
        super().__init__()
        default_client_key()
        self.finetunable = False
        self.reinforceable = True
        self.ReinforceJob = ArborReinforceJob

    @staticmethod
    def is_provider_model(model: str) -> bool:
        return model.startswith(PREFIX)
