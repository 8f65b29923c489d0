"""Tokenised training batches: exactly the sampled ids, prompts left-padded, completions right-padded.

Departures from TRL / Arbor:
1. Nothing is re-tokenised: a sequence is the engine's prompt ids followed by its completion
   ids (Arbor re-renders both with another adapter).
2. Limits are counted, never silent. A prompt over `max_prompt_length` drops its sequence:
   its completion was sampled after the whole prompt, so training it on a shorter one would
   train on a context the policy never saw (TRL cuts prompts before sampling; a DSPy program's
   prompts are built by its adapter, so the limit can only be checked here). A completion over
   `max_completion_length` keeps its first tokens: their context is unchanged.
3. Left-padded prompts put every completion at the same columns, so the model only computes
   logits for the completion block (`logits_to_keep`), never for prompt positions.
4. `mask_truncated_completions` drops a sequence the engine cut at its token limit (the
   sample says so, from the finish reason); TRL zeroes its mask when the last token is not EOS.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from espalier.types import Group


@dataclass(frozen=True)
class TrainSequence:
    prompt_ids: tuple[int, ...]
    completion_ids: tuple[int, ...]
    reward: float
    advantage: float
    sampling_logprobs: tuple[float, ...] | None  # the engine's, for the sampler/trainer correction only


@dataclass(frozen=True)
class Truncation:
    prompts: int = 0  # sequences dropped: prompt over max_prompt_length
    completions: int = 0  # completions cut to max_completion_length
    masked: int = 0  # sequences left out because the engine cut them at its token limit


@dataclass
class MicroBatch:
    input_ids: torch.Tensor  # (B, P + C) left-padded prompt, then right-padded completion
    attention_mask: torch.Tensor  # (B, P + C)
    position_ids: torch.Tensor  # (B, P + C) positions that skip the left padding
    completion_ids: torch.Tensor  # (B, C)
    completion_mask: torch.Tensor  # (B, C) float, 1 on real completion tokens
    advantages: torch.Tensor  # (B,)
    sampling_logprobs: torch.Tensor  # (B, C) the engine's sampling log-probs, 0 where absent
    sampling_mask: torch.Tensor  # (B, C) 1 where the engine gave a log-prob
    indices: list[int]  # positions of these sequences in the step's list

    @property
    def completion_width(self) -> int:
        return self.completion_ids.shape[1]

    def to(self, device: torch.device | str) -> MicroBatch:
        moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in vars(self).items()}
        return MicroBatch(**moved)


def build_sequences(
    groups: Sequence[Group],
    advantages: Sequence[float],
    max_prompt_length: int | None,
    max_completion_length: int | None,
    mask_truncated_completions: bool = False,
) -> tuple[list[TrainSequence], Truncation]:
    """Flatten groups into sequences (group order, then sample order), applying the limits as configured.

    With `mask_truncated_completions`, a sample the engine cut at its token limit is dropped
    (after the advantages, which it still shaped, as in TRL): no loss, no share of the normaliser."""
    samples = [s for g in groups for s in g.samples]
    out, long_prompts, cut_completions, masked = [], 0, 0, 0
    for sample, advantage in zip(samples, advantages, strict=True):
        if mask_truncated_completions and sample.truncated:
            masked += 1
            continue
        prompt, completion, logprobs = sample.prompt_ids, sample.completion_ids, sample.logprobs
        if max_prompt_length is not None and len(prompt) > max_prompt_length:
            long_prompts += 1
            continue
        if max_completion_length is not None and len(completion) > max_completion_length:
            completion, cut_completions = completion[:max_completion_length], cut_completions + 1
            logprobs = None if logprobs is None else logprobs[:max_completion_length]
        out.append(TrainSequence(prompt, completion, sample.reward, advantage, logprobs))
    return out, Truncation(long_prompts, cut_completions, masked)


def collate(sequences: Sequence[TrainSequence], indices: Sequence[int], pad_id: int) -> MicroBatch:
    """Pad a list of sequences into one micro-batch (see module docstring for the layout)."""
    width_p = max(len(s.prompt_ids) for s in sequences)
    width_c = max(len(s.completion_ids) for s in sequences)
    rows, masks, completions, completion_masks, sampled, sampled_masks = [], [], [], [], [], []
    for s in sequences:
        pad_left, pad_right = width_p - len(s.prompt_ids), width_c - len(s.completion_ids)
        given = list(s.sampling_logprobs or ())
        sampled.append(given + [0.0] * (width_c - len(given)))
        sampled_masks.append([1.0] * len(given) + [0.0] * (width_c - len(given)))
        rows.append([pad_id] * pad_left + list(s.prompt_ids) + list(s.completion_ids) + [pad_id] * pad_right)
        masks.append([0] * pad_left + [1] * (len(s.prompt_ids) + len(s.completion_ids)) + [0] * pad_right)
        completions.append(list(s.completion_ids) + [pad_id] * pad_right)
        completion_masks.append([1.0] * len(s.completion_ids) + [0.0] * pad_right)
    attention_mask = torch.tensor(masks)  # (B, P + C)
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)  # (B, P + C)
    return MicroBatch(
        input_ids=torch.tensor(rows),
        attention_mask=attention_mask,
        position_ids=position_ids,
        completion_ids=torch.tensor(completions),
        completion_mask=torch.tensor(completion_masks),
        advantages=torch.tensor([s.advantage for s in sequences], dtype=torch.float32),
        sampling_logprobs=torch.tensor(sampled, dtype=torch.float32),
        sampling_mask=torch.tensor(sampled_masks),
        indices=list(indices),
    )


def fed_rows(mb: MicroBatch) -> list[dict[str, list[int] | float]]:
    """What the model is fed, read back from the tensors: each row's unpadded prompt and loss-bearing completion."""
    rows = []
    for r in range(mb.input_ids.shape[0]):
        fed = mb.input_ids[r][mb.attention_mask[r].bool()].tolist()
        completion = mb.completion_ids[r][mb.completion_mask[r].bool()].tolist()
        rows.append({"prompt_ids": fed[: len(fed) - len(completion)], "completion_ids": completion,
                     "advantage": float(mb.advantages[r])})
    return rows


def chunks(items: Sequence[int], size: int) -> list[list[int]]:
    """Consecutive slices of `size` (the last may be short)."""
    return [list(items[i : i + size]) for i in range(0, len(items), size)]
