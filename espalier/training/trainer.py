"""The GRPO trainer: LoRA policy updates on exactly the sampled tokens.

One `train_step(groups)` reads top to bottom: advantages per group, sequences (truncated and
counted), the step's sequences cut into optimizer batches of
`per_device_train_batch_size x gradient_accumulation_steps x processes`, each process's share
cut into micro-batches, then forward / clipped loss / backward per micro-batch and one AdamW
update per optimizer batch.

Departures from the paper / TRL / Arbor:
1. Every sample of every group is trained on; the last optimizer batch may be short (Arbor
   trains one group per optimizer step and discards most rollouts).
2. The ratio's "old" policy is the trainer's own forward pass of the policy that sampled (the
   weights before the step's first update, at the resolved sampling temperature), so every
   ratio is exactly 1 before the first update whatever the sampler did: on the step's first
   optimizer batch it is the same forward pass, detached (as TRL does), which saves a forward;
   for later batches it is computed once before the first update, micro-batch by micro-batch as
   they will be trained, in train mode with the same dropout masks as their later forward
   (seeded per micro-batch), so LoRA dropout and bf16 leave the ratio exactly 1 too (TRL draws
   fresh masks, so its ratios deviate from 1 by the dropout noise).
3. The engine's sampling log-probs never stand in for "old": they differ from the trainer's by
   what the trainer does not model (top_p, top_k, repetition_penalty, kernels, bf16). They
   serve only truncated importance sampling (TIS, as in verl and TRL): each token's policy
   loss is weighted by min(exp(logp_old - logp_sampler), vllm_importance_sampling_cap), and
   the gap is logged every step (`mismatch_*` in `extra`). Log-probs are taken at the
   sampling temperature (logits / temperature), in fp32 even under bf16 autocast; top_p,
   top_k and repetition_penalty shape sampling only, as in TRL and verl.
4. The KL reference is the adapter-free base model (peft `disable_adapter()`), computed only
   when beta > 0; there is no reference copy of the weights.
5. Gradient accumulation: losses are normalised by counts of the whole optimizer batch (see
   losses.py), gradients are summed over micro-batches and processes, never averaged.
6. `max_steps` caps optimizer steps for the trainer's lifetime; once reached, `train_step`
   stops and says so (`extra["max_steps_reached"]`, `extra["sequences_not_trained"]`).
7. Sequences whose gradient is exactly zero (advantage 0 and beta 0, not bnpo) skip their
   forward and backward; their tokens still count in the normaliser, so the update is the same.
8. A non-finite gradient norm skips that optimizer update (logged, `extra["skipped_nonfinite"]`),
   so a NaN never reaches the weights; TRL applies it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from espalier.config import TrainConfig
from espalier.models import load_causal_lm
from espalier.training.advantages import compute_advantages
from espalier.training.batch import MicroBatch, TrainSequence, build_sequences, chunks, collate, fed_rows
from espalier.training.checkpoint import atomic_directory
from espalier.training.distributed import Processes, SingleProcess
from espalier.training.lora import apply_lora
from espalier.training.losses import (
    REDUCTIONS,
    Normalizer,
    clip_fractions,
    sampling_correction,
    selective_log_softmax,
    token_loss,
)
from espalier.training.optim import build_optimizer, build_scheduler, schedule_length
from espalier.training.record import OnFed
from espalier.types import Group, StepMetrics

ADAPTER_WEIGHTS = "adapter_model.safetensors"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Micro:
    """One micro-batch: positions of its sequences in the step's list, and the seed of its dropout masks."""

    indices: list[int]
    seed: int


class GRPOTrainer:
    def __init__(
        self,
        model_path: Path | str,
        config: TrainConfig,
        device: str = "cpu",
        processes: Processes | None = None,
        on_fed: OnFed | None = None,
    ) -> None:
        """`on_fed`, when given, is called with the rows of every sequence fed or skipped (record.py)."""
        self.config = config
        self.device = torch.device(device)
        self.processes = processes or SingleProcess()
        self.model_path = str(model_path)
        torch.manual_seed(config.seed)  # same seed on every process: identical LoRA init
        base = load_causal_lm(model_path, torch.float32)  # fp32 master weights; bf16 is autocast only
        pad = base.config.pad_token_id if base.config.pad_token_id is not None else base.config.eos_token_id
        self.pad_id = int(pad[0] if isinstance(pad, list) else pad or 0)
        if config.gradient_checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            base.enable_input_require_grads()  # peft: frozen embeddings still need an input that requires grad
        self.model = apply_lora(base, config.lora_config, self.model_path).to(self.device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.params, config)
        # A schedule whose length depends on the updates per GRPO step is built at the first step.
        needs_length = config.needs_schedule_length and config.max_steps is None
        self.scheduler = None if needs_length else build_scheduler(self.optimizer, config, config.max_steps)
        self.schedule_total: int | None = config.max_steps
        self.reduce = REDUCTIONS[config.loss_type]
        self.optimizer_steps = 0
        self.on_fed = on_fed
        self.skip_zero_advantage = True  # see _needs_compute

    # ---- the step -------------------------------------------------------------------------

    def train_step(self, groups: Sequence[Group]) -> list[StepMetrics]:
        """Train on every sample of every group; one StepMetrics per optimizer step."""
        cfg, world = self.config, self.processes.world_size
        advantages = compute_advantages(groups, cfg.scale_rewards)
        sequences, truncation = build_sequences(groups, advantages, cfg.max_prompt_length, cfg.max_completion_length,
                                                cfg.mask_truncated_completions)
        batches = chunks(range(len(sequences)), cfg.total_batch_size * world)
        if self.scheduler is None:
            self._build_scheduler(schedule_length(cfg, len(batches)))
        room = math.inf if cfg.max_steps is None else max(cfg.max_steps - self.optimizer_steps, 0)
        trained, skipped = batches[: int(min(room, len(batches)))], batches[int(min(room, len(batches))) :]
        plans = [self._micro_batches(sequences, batch) for batch in trained]
        start = time.perf_counter()
        old = self._old_logprobs(sequences, [mb for plan in plans[1:] for mb in plan])
        old_s = time.perf_counter() - start  # the step's pre-update forward passes, outside every optimizer step
        metrics = [self._optimizer_step(sequences, batch, plan, old) for batch, plan in zip(trained, plans, strict=True)]
        extra = {"dropped_long_prompts": float(truncation.prompts), "truncated_completions": float(truncation.completions),
                 "masked_truncated_completions": float(truncation.masked), "time/old_logprobs_s": old_s}
        if skipped or room == 0:
            extra |= {"max_steps_reached": 1.0, "sequences_not_trained": float(sum(len(b) for b in skipped))}
        if truncation.prompts:
            log.warning("%d sequence(s) dropped: prompt over max_prompt_length=%s", truncation.prompts,
                        cfg.max_prompt_length)
        metrics = metrics or [self._empty_metrics(sequences)]  # nothing left to train still reports why
        for m in metrics:
            m.extra.update(extra)
        return metrics

    def _micro_batches(self, sequences: list[TrainSequence], batch: list[int]) -> list[Micro]:
        """This process's micro-batches of one optimizer batch, each with the seed of its dropout masks."""
        shard = batch[self.processes.rank :: self.processes.world_size]
        active = [i for i in shard if self._needs_compute(sequences[i])]
        base = int(torch.randint(0, 2**40, (1,)))  # one draw per batch on every process: the RNGs stay in step
        seed = base * 4096 + self.processes.rank * 64  # distinct per process and micro-batch
        return [Micro(ids, seed + n) for n, ids in enumerate(chunks(active, self.config.per_device_train_batch_size))]

    def _optimizer_step(
        self, sequences: list[TrainSequence], batch: list[int], micro: list[Micro], old: dict[int, torch.Tensor]
    ) -> StepMetrics:
        cfg, procs = self.config, self.processes
        start = time.perf_counter()
        world = procs.world_size
        computed = {i for m in micro for i in m.indices}
        self._record_skipped(sequences, [i for i in batch[procs.rank :: world] if i not in computed])
        lengths = [len(sequences[i].completion_ids) for i in batch]
        norm = Normalizer(
            num_sequences=len(batch),
            num_tokens=sum(lengths),
            num_micro_batches=sum(len(chunks(batch[r::world], cfg.per_device_train_batch_size)) for r in range(world)),
            fixed_length=cfg.max_completion_length or max(lengths),
        )
        self.model.train()
        # loss, low-clipped, high-clipped, kl sum, completion tokens, all tokens, then the sampler gap
        # (tokens with sampling log-probs, sum |gap|, tokens with |gap| > 0.1, TIS weights capped), this process
        stats = torch.zeros(10, dtype=torch.float64)
        ratio_dev = torch.zeros(world, dtype=torch.float64)  # max |ratio - 1| of each process, in its own slot
        for m in micro:
            mb = collate([sequences[i] for i in m.indices], m.indices, self.pad_id).to(self.device)
            self._record(mb)
            with self._autocast():
                with self._dropout_masks(m.seed):
                    logp = self._logprobs(mb)  # (B, C)
                ref = self._reference_logprobs(mb) if cfg.beta > 0 else None  # (B, C) | None
            old_logp = self._stack_old(old, mb, logp.detach())  # (B, C)
            mask = mb.completion_mask  # (B, C)
            correction = sampling_correction(old_logp, mb.sampling_logprobs, mb.sampling_mask * mask, self._tis_cap)
            terms = token_loss(
                logp, old_logp, mb.advantages, cfg.epsilon, cfg.epsilon_high, ref, cfg.beta, correction.weight
            )
            loss = self.reduce(terms.loss, mask, norm)
            loss.backward()
            ratio = terms.ratio.detach()  # (B, C)
            low, high = clip_fractions(ratio, mb.advantages, mask, cfg.epsilon, cfg.epsilon_high)
            kl = (terms.kl.detach() * mask).sum().item()
            head = [loss.item(), low, high, kl, mask.sum().item(), mb.attention_mask.sum().item()]
            stats += torch.tensor(head + correction.counts)
            dev = ((ratio - 1).abs() * mask).max().item()
            ratio_dev[procs.rank] = max(ratio_dev[procs.rank].item(), dev)
        for p in self.params:  # a batch of zero-advantage sequences still takes its (zero-gradient) AdamW step
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        self._sum_gradients()
        stats, ratio_dev = procs.sum_(stats), procs.sum_(ratio_dev)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm or math.inf)
        learning_rate = self.scheduler.get_last_lr()[0]  # built by train_step
        finite = bool(torch.isfinite(grad_norm))  # the same on every rank: the gradients were summed
        if finite:
            self.optimizer.step()
        else:
            log.warning("optimizer step %d: gradient norm %s; the update is skipped", self.optimizer_steps + 1, grad_norm.item())
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.optimizer_steps += 1
        loss, low, high, kl, tokens, all_tokens, sampled, gap, far, capped = stats.tolist()
        tokens = max(tokens, 1.0)  # a batch of zero-advantage sequences computes none
        rewards = torch.tensor([sequences[i].reward for i in batch], dtype=torch.float64)  # (N,)
        advs = torch.tensor([sequences[i].advantage for i in batch], dtype=torch.float64)  # (N,)
        return StepMetrics(
            step=self.optimizer_steps,
            loss=loss,
            reward_mean=rewards.mean().item(),
            reward_std=rewards.std(unbiased=False).item(),
            advantage_std=advs.std(unbiased=False).item(),
            clip_ratio_low=low / tokens,
            clip_ratio_high=high / tokens,
            kl=kl / tokens,
            completion_length_mean=sum(lengths) / len(lengths),
            completion_length_max=float(max(lengths)),
            tokens_per_second=all_tokens / (time.perf_counter() - start),
            grad_norm=grad_norm.item(),
            learning_rate=learning_rate,
            num_sequences=len(batch),
            extra={
                "completion_tokens": tokens,
                "micro_batches": float(norm.num_micro_batches),
                "ratio_max_deviation": ratio_dev.max().item(),
                "mismatch_tokens": sampled,  # computed tokens that came with the sampler's log-probs
                "mismatch_mean_abs_logprob": gap / max(sampled, 1.0),
                "mismatch_share_over_0.1": far / max(sampled, 1.0),
                "mismatch_tis_capped_share": capped / max(sampled, 1.0),
                "skipped_nonfinite": float(not finite),
            },
        )

    # ---- pieces ---------------------------------------------------------------------------

    def _needs_compute(self, sequence: TrainSequence) -> bool:
        """False when the sequence's gradient is exactly zero: no advantage and no KL term.

        Its tokens still count in the loss normaliser (dapo, dr_grpo, grpo), so skipping its
        forward and backward changes nothing but the time. bnpo averages per micro-batch, so
        there every sequence is computed to keep the micro-batches as configured."""
        cfg = self.config
        return not self.skip_zero_advantage or sequence.advantage != 0.0 or cfg.beta > 0 or cfg.loss_type == "bnpo"

    def _record_skipped(self, sequences: list[TrainSequence], skipped: list[int]) -> None:
        if self.on_fed is not None and skipped:
            self._record(collate([sequences[i] for i in skipped], skipped, self.pad_id), computed=False)

    def _record(self, mb: MicroBatch, computed: bool = True) -> None:
        if self.on_fed is not None:
            step = self.optimizer_steps + 1
            self.on_fed([{"optimizer_step": step, "computed": computed, **row} for row in fed_rows(mb)])

    @property
    def _tis_cap(self) -> float | None:
        cfg = self.config
        return cfg.vllm_importance_sampling_cap if cfg.vllm_importance_sampling_correction else None

    def _build_scheduler(self, total: int | None) -> None:
        self.scheduler, self.schedule_total = build_scheduler(self.optimizer, self.config, total), total

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.bf16)

    def _logprobs(self, mb: MicroBatch) -> torch.Tensor:
        """Log-probs (B, C) of the completion tokens at the sampling temperature; no prompt logits are computed."""
        width = mb.completion_width
        out = self.model(
            input_ids=mb.input_ids,
            attention_mask=mb.attention_mask,
            position_ids=mb.position_ids,
            logits_to_keep=width + 1,
            use_cache=False,
        )
        if out.logits.shape[1] != width + 1:  # a model ignoring logits_to_keep would align prompt positions
            raise RuntimeError(f"the model returned {out.logits.shape[1]} logit positions for logits_to_keep={width + 1}")
        logits = out.logits[:, :-1].float() / self.config.temperature  # (B, C, V): position t predicts token t + 1
        return selective_log_softmax(logits, mb.completion_ids)  # (B, C)

    @torch.no_grad()
    def _reference_logprobs(self, mb: MicroBatch) -> torch.Tensor:
        with self.model.disable_adapter():
            return self._logprobs(mb)  # (B, C)

    @torch.no_grad()
    def _old_logprobs(self, sequences: list[TrainSequence], micro: list[Micro]) -> dict[int, torch.Tensor]:
        """The pre-update policy's log-probs, micro-batch by micro-batch as they will be trained, with the
        same dropout masks: at lr 0 the ratio is then exactly 1, dropout and bf16 included."""
        old: dict[int, torch.Tensor] = {}
        self.model.train()
        for m in micro:
            mb = collate([sequences[i] for i in m.indices], m.indices, self.pad_id).to(self.device)
            with self._autocast(), self._dropout_masks(m.seed):
                logp = self._logprobs(mb).cpu()  # (B, C)
            for row, i in enumerate(m.indices):
                old[i] = logp[row, : len(sequences[i].completion_ids)]
        return old

    @contextlib.contextmanager
    def _dropout_masks(self, seed: int):
        """A forward whose dropout masks are a function of `seed` only (the global RNG is left as it was)."""
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices, device_type=self.device.type):
            torch.manual_seed(seed)
            yield

    @staticmethod
    def _stack_old(old: dict[int, torch.Tensor], mb: MicroBatch, current: torch.Tensor) -> torch.Tensor:
        """(B, C) old log-probs; rows of the step's first optimizer batch are the current forward's, detached."""
        rows = []
        for row, i in enumerate(mb.indices):
            if i not in old:
                rows.append(current[row])
                continue
            given = old[i].to(current.device, torch.float32)
            rows.append(torch.cat([given, current.new_zeros(current.shape[1] - given.numel())]))
        return torch.stack(rows)  # (B, C)

    def _sum_gradients(self) -> None:
        if self.processes.world_size == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        flat = self.processes.sum_(torch.cat([g.reshape(-1) for g in grads]))  # (num trainable,)
        offset = 0
        for p, g in zip(self.params, grads, strict=True):
            p.grad = flat[offset : offset + g.numel()].view_as(p).clone()
            offset += g.numel()

    def _empty_metrics(self, sequences: list[TrainSequence]) -> StepMetrics:
        lr = self.scheduler.get_last_lr()[0] if self.scheduler is not None else self.config.learning_rate
        return StepMetrics(self.optimizer_steps, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, lr, 0)

    # ---- checkpoints ----------------------------------------------------------------------

    def export_adapter(self, directory: Path | str) -> Path:
        """Write the adapter in peft's layout (adapter_config.json + adapter_model.safetensors), atomically."""
        directory = Path(directory)
        if self.processes.rank == 0:
            with atomic_directory(directory) as tmp:
                self.model.save_pretrained(tmp, safe_serialization=True)
        self.processes.barrier()
        return directory

    def save_checkpoint(self, directory: Path | str) -> None:
        """Adapter + optimizer + scheduler + RNG + step counter, atomically."""
        directory = Path(directory)
        if self.processes.rank == 0:
            with atomic_directory(directory) as tmp:
                self.model.save_pretrained(tmp / "adapter", safe_serialization=True)
                torch.save(
                    {
                        "optimizer": self.optimizer.state_dict(),
                        "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
                        "torch_rng": torch.get_rng_state(),
                        "python_rng": random.getstate(),
                    },
                    tmp / "trainer_state.pt",
                )
                state = {"optimizer_steps": self.optimizer_steps, "schedule_total": self.schedule_total}
                (tmp / "trainer_state.json").write_text(json.dumps(state))
        self.processes.barrier()

    def load_checkpoint(self, directory: Path | str) -> None:
        import peft

        directory = Path(directory)
        peft.set_peft_model_state_dict(self.model, load_file(directory / "adapter" / ADAPTER_WEIGHTS))
        state = torch.load(directory / "trainer_state.pt", weights_only=False)
        counters = json.loads((directory / "trainer_state.json").read_text())
        if self.scheduler is None:
            self._build_scheduler(counters.get("schedule_total"))
        self.optimizer.load_state_dict(state["optimizer"])
        if state["scheduler"] is not None and self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])
        self.optimizer_steps = counters["optimizer_steps"]
