"""Arbor's GRPO batches as `espalier.types.Group`s, and the checks a step's groups must pass.

A batch item is `{batch_id, group: [...]}`, a bare list of members, or one flat group; a member
carries its `reward` and either the sampled ids (`prompt_ids`, `completion_ids`, `logprobs`) or
its `messages` and `completion`, tokenised with the server's own chat template.

Departures from Arbor:
1. Batch items keep the ids that were sampled when a member has them; a text member is
   tokenised with the template that sampled it, never re-rendered by another adapter.
2. Groups are checked against the served model (vocabulary, context) before any training, and
   a wrong group size (`num_generations`) is a ValueError naming the fix, as Arbor checks.
"""

from __future__ import annotations

from typing import Any

from espalier.inference.chat import completion_ids, normalize_messages, prompt_ids
from espalier.types import Group, Sample


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
