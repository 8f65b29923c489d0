"""Arbor's wire formats for the GRPO job routes, turned into the project's own types.

`initialize_request` reads an initialize body (flat train kwargs, or `trainer_config`, and
`gpu_config`) into an `InitializeRequest` holding a validated `TrainConfig`; `step_request`
reads a step body (Espalier's `groups`, or one of Arbor's three batch layouts) into a
`StepRequest` of `Group`s checked against the served model; `PendingBatches` is Arbor's
`pending_batch_ids`. The routes (grpo_routes.py) and the job (job.py) see only these types.

A batch item is `{batch_id, group: [...]}`, a bare list of members, or one flat group; a member
carries its `reward` and either the sampled ids (`prompt_ids`, `completion_ids`, `logprobs`) or
its `messages` and `completion`, tokenised with the server's own chat template.

Departures from Arbor:
1. Batch items keep the ids that were sampled when a member has them; a text member is
   tokenised with the template that sampled it, never re-rendered by another adapter.
2. Groups are checked against the served model (vocabulary, context) before any training, and
   a wrong group size (`num_generations`) is a ValueError naming the fix, as Arbor checks.
3. `initialize` accepts both Arbor layouts: flat train kwargs (older clients) or
   `trainer_config` (newer); keys whose value is null are defaults; any other key goes to
   `TrainConfig`, which rejects unknown ones with a 400 that lists the known keys.
4. `step` also accepts Espalier's `groups` (a list of `Group.to_dict()`), so token ids and
   sampling log-probs cross unchanged.
5. `pending_batch_ids` advertises `batches_per_step` ids at a time (default 1, as Arbor's
   clients expect one group per id); Espalier's own client sends groups without ids.
6. `resume_job` and `resume_step` (Espalier's) name an earlier job of the server's run
   directory to go on with.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from jinja2 import TemplateError

from espalier.config import TrainConfig
from espalier.inference.chat import completion_ids, normalize_messages, prompt_ids
from espalier.inference.openai_api import BadRequest
from espalier.types import Group, Sample

_META = {"model", "suffix", "trainer_config", "inference_config", "gpu_config", "batches_per_step", "job_id",
         "wandb_kwargs", "grpo_flavor", "resume_job", "resume_step"}
MAX_BATCHES_PER_STEP = 1024
CHECKPOINT_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")


@dataclass(frozen=True)
class InitializeRequest:
    model: Any  # the model asked for (the route checks it is the served one)
    config: TrainConfig
    batches_per_step: int = 1
    resume: tuple[str, int] | None = None  # (job_id, step): go on with that job from the state after that step


@dataclass(frozen=True)
class StepRequest:
    groups: tuple[Group, ...]
    batch_ids: tuple[int, ...]  # Arbor's batch ids this step answers (none: the oldest pending one)


@dataclass(frozen=True)
class CheckpointRequest:
    name: str
    metadata: dict[str, Any] | None


def initialize_request(body: dict[str, Any]) -> InitializeRequest:
    try:
        config = TrainConfig.from_kwargs(_train_kwargs(body))
    except (ValueError, TypeError) as e:
        raise BadRequest(str(e), "trainer_config") from e
    return InitializeRequest(body.get("model"), config, _batches_per_step(body), _resume(body))


def _object(body: dict[str, Any], name: str) -> dict[str, Any]:
    value = body.get(name) or {}
    if not isinstance(value, dict):
        raise BadRequest(f"{name} must be an object, got {type(value).__name__}", name)
    return value


def _train_kwargs(body: dict[str, Any]) -> dict[str, Any]:
    kwargs = {k: v for k, v in body.items() if k not in _META and v is not None}
    kwargs.update({k: v for k, v in _object(body, "trainer_config").items() if v is not None})
    gpu = _object(_object(body, "gpu_config"), "multi")
    for key in ("num_training_gpus", "num_inference_gpus"):
        if key in gpu and key not in kwargs:
            kwargs[key] = gpu[key]
    return kwargs


def _batches_per_step(body: dict[str, Any]) -> int:
    value = body.get("batches_per_step")
    if value is None:
        return 1
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_BATCHES_PER_STEP:
        raise BadRequest(f"batches_per_step must be an integer in [1, {MAX_BATCHES_PER_STEP}], got {value!r}",
                         "batches_per_step")
    return value


def _resume(body: dict[str, Any]) -> tuple[str, int] | None:
    job, step = body.get("resume_job"), body.get("resume_step", 0)
    if job is None:
        return None
    if not isinstance(job, str) or not re.fullmatch(r"grpo-[0-9a-f]{12}", job):
        raise BadRequest(f"resume_job must be a job id like 'grpo-0123456789ab', got {job!r}", "resume_job")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise BadRequest(f"resume_step must be an integer >= 0, got {step!r}", "resume_step")
    return job, step


def job_id(body: dict[str, Any]) -> str | None:
    given = body.get("job_id")
    if given is not None and not isinstance(given, str):
        raise BadRequest(f"job_id must be a string, got {given!r}"[:200], "job_id")
    return given


def step_request(body: dict[str, Any], tokenizer, vocab_size: int, max_model_len: int,
                 group_size: int | None) -> StepRequest:
    """The step's groups (Espalier's `groups` or an Arbor `batch`), checked against the served model."""
    try:
        if body.get("groups") is not None:
            if not isinstance(body["groups"], list):
                raise ValueError("groups must be a list of {key, samples} objects")
            groups, ids = [Group.from_dict(g) for g in body["groups"]], []
        else:
            groups, ids = groups_from_batch(body.get("batch"), tokenizer)
        check_groups(groups, vocab_size, max_model_len, group_size)
    except (ValueError, KeyError, TypeError, AttributeError, OverflowError, TemplateError) as e:
        raise BadRequest(f"bad GRPO batch: {e}"[:2000], "batch") from e
    if not ids and isinstance(body.get("batch_id"), int):
        ids = [body["batch_id"]]  # Arbor's client: one group of members, its batch id beside it
    return StepRequest(tuple(groups), tuple(ids))


def checkpoint_request(body: dict[str, Any]) -> CheckpointRequest:
    name, metadata = body.get("checkpoint_name"), body.get("metadata")
    if not isinstance(name, str) or not CHECKPOINT_NAME.fullmatch(name) or name == "base":
        raise BadRequest("checkpoint_name must be 1-128 letters, digits, '.', '-' or '_', not starting with '.', "
                         "and not 'base'", "checkpoint_name")
    if metadata is not None and not isinstance(metadata, dict):
        raise BadRequest("metadata must be an object", "metadata")
    return CheckpointRequest(name, metadata)


class PendingBatches:
    """Arbor's `pending_batch_ids`: `per_step` ids on offer; a step retires the ids it names (else the oldest)."""

    def __init__(self, per_step: int) -> None:
        self.per_step, self.ids, self._next = per_step, [], 0
        self._refill()

    def retire(self, ids: tuple[int, ...]) -> None:
        done = set(ids) or set(self.ids[:1])
        self.ids = [b for b in self.ids if b not in done]
        self._refill()

    def _refill(self) -> None:
        while len(self.ids) < self.per_step:
            self.ids.append(self._next)
            self._next += 1


def _member_sample(member: dict[str, Any], tokenizer) -> Sample:
    if "reward" not in member:
        raise ValueError("every group member needs a 'reward'")
    if member.get("prompt_ids") is not None and member.get("completion_ids") is not None:
        prompt, completion = list(member["prompt_ids"]), list(member["completion_ids"])
    else:
        messages = normalize_messages(member.get("messages"))
        reply = member.get("completion")
        text = reply.get("content") if isinstance(reply, dict) else reply
        if not isinstance(text, str):
            raise ValueError("a member without token ids needs 'messages' and 'completion': {'content': ...}")
        prompt, completion = prompt_ids(tokenizer, messages), completion_ids(tokenizer, text)
    logprobs = member.get("logprobs")
    truncated = bool(member.get("truncated")) or member.get("finish_reason") == "length"  # text members: unknown
    return Sample(tuple(prompt), tuple(completion), float(member["reward"]),
                  None if logprobs is None else tuple(float(x) for x in logprobs), truncated)


def check_groups(groups: list[Group], vocab_size: int, max_model_len: int, group_size: int | None = None) -> None:
    """A step's groups fit the served model (token ids in its vocabulary, sequences within its context) and, when
    the job was given `num_generations`, hold that many samples each, as Arbor requires."""
    if not groups:
        raise ValueError("a step needs at least one group")
    for g in groups:
        if not g.samples:
            raise ValueError(f"group {g.key!r} has no samples")
        if group_size is not None and len(g.samples) != group_size:
            raise ValueError(f"group {g.key!r} has {len(g.samples)} samples but the job's num_generations is "
                             f"{group_size}: send groups of {group_size}, or initialize without num_generations")
        for s in g.samples:
            if max(max(s.prompt_ids), max(s.completion_ids)) >= vocab_size:
                raise ValueError(f"group {g.key!r}: a token id is outside the model's vocabulary of {vocab_size}")
            if len(s.prompt_ids) + len(s.completion_ids) > max_model_len:
                raise ValueError(f"group {g.key!r}: a sample of {len(s.prompt_ids) + len(s.completion_ids)} tokens "
                                 f"is longer than the model's context of {max_model_len}")


def groups_from_batch(batch: list[Any], tokenizer) -> tuple[list[Group], list[int]]:
    """Arbor batch items (`{batch_id, group: [...]}`, a bare list of members, or one flat group)."""
    if not isinstance(batch, list) or not batch:
        raise ValueError("batch must be a non-empty list")
    if all(isinstance(m, dict) and "group" not in m for m in batch):
        batch = [batch]  # one flat group of members
    groups, ids = [], []
    for i, item in enumerate(batch):
        members = item.get("group") if isinstance(item, dict) else item
        if not isinstance(members, list) or not members:
            raise ValueError(f"batch item {i} has no group members")
        if isinstance(item, dict) and item.get("batch_id") is not None:
            ids.append(int(item["batch_id"]))
        key = f"batch{item.get('batch_id')}" if isinstance(item, dict) else f"item{i}"
        groups.append(Group(tuple(_member_sample(m, tokenizer) for m in members), key=key))
    return groups, ids
