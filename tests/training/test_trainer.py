"""The trainer on a tiny random Llama: loss conventions, exact tokens, no prompt gradient, caps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from espalier.config import TrainConfig
from espalier.training import GRPOTrainer
from espalier.types import Group, Sample

NO_DROPOUT = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj", "up_proj"]}


def _trainer(model_dir: Path, **kwargs) -> GRPOTrainer:
    base = {"learning_rate": 1e-2, "lora_config": NO_DROPOUT, "scale_rewards": "none"}
    return GRPOTrainer(model_dir, TrainConfig.from_kwargs(base | kwargs))


# Two groups; rewards give advantages (r - group mean) of +-1 and +-0.5; completion lengths 1..4.
GROUPS = [
    Group((Sample((5, 6, 7), (10, 11), 2.0), Sample((5, 6, 7), (12,), 0.0)), key="a"),
    Group((Sample((8, 9), (13, 14, 15, 16), 1.0), Sample((8, 9), (17, 18, 19), 0.0)), key="b"),
]
ADV_LEN = [(1.0, 2), (-1.0, 1), (0.5, 4), (-0.5, 3)]


def _first_step_hand_loss(loss_type: str, micro: int) -> float:
    """Ratio is exactly 1 on the first optimizer batch, so l_it = -A_i; the reductions by hand."""
    n, tokens = len(ADV_LEN), sum(length for _, length in ADV_LEN)
    if loss_type == "grpo":
        return sum(-a for a, _ in ADV_LEN) / n  # per-sequence mean of -A_i is -A_i
    if loss_type == "dapo":
        return sum(-a * length for a, length in ADV_LEN) / tokens
    if loss_type == "dr_grpo":
        return sum(-a * length for a, length in ADV_LEN) / (4 * n)  # the longest completion, 4, is L
    parts = [ADV_LEN[i : i + micro] for i in range(0, n, micro)]  # bnpo: token mean per micro-batch
    return sum(sum(-a * ln for a, ln in p) / sum(ln for _, ln in p) for p in parts) / len(parts)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize(("batch", "accumulation"), [(1, 4), (3, 2)])
def test_first_step_loss_by_hand(tiny_llama_dir: Path, loss_type: str, batch: int, accumulation: int) -> None:
    trainer = _trainer(
        tiny_llama_dir, loss_type=loss_type, per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation
    )
    [metrics] = trainer.train_step(GROUPS)
    assert metrics.loss == pytest.approx(_first_step_hand_loss(loss_type, batch), abs=1e-6)
    assert metrics.num_sequences == 4 and metrics.extra["micro_batches"] == -(-4 // batch)
    assert metrics.extra["completion_tokens"] == 10 and metrics.completion_length_max == 4
    assert metrics.reward_mean == pytest.approx(0.75) and metrics.clip_ratio_low == 0.0


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_update_does_not_depend_on_micro_batching(tiny_llama_dir: Path, loss_type: str) -> None:
    weights = []
    for batch, accumulation in [(4, 1), (1, 4), (3, 2)]:
        trainer = _trainer(
            tiny_llama_dir,
            loss_type=loss_type,
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=accumulation,
        )
        trainer.train_step(GROUPS)
        weights.append(torch.cat([p.detach().reshape(-1) for p in trainer.params]))
    torch.testing.assert_close(weights[0], weights[1], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(weights[0], weights[2], atol=1e-6, rtol=1e-5)


def test_trained_tokens_are_the_sampled_ones_and_prompts_get_no_gradient(tiny_llama_dir: Path) -> None:
    trainer = _trainer(tiny_llama_dir, per_device_train_batch_size=4)
    seen: dict[str, torch.Tensor] = {}

    def grab_inputs(module, args, kwargs):
        seen["input_ids"], seen["mask"] = kwargs["input_ids"], kwargs["attention_mask"]

    def grab_logits(module, args, output):
        output.retain_grad()
        seen["logits"] = output

    llama = trainer.model.get_base_model()
    llama.register_forward_pre_hook(grab_inputs, with_kwargs=True)
    llama.lm_head.register_forward_hook(grab_logits)
    trainer.train_step(GROUPS)

    rows = [[s.prompt_ids, s.completion_ids] for g in GROUPS for s in g.samples]
    for row, (ids, mask) in enumerate(zip(seen["input_ids"].tolist(), seen["mask"].tolist(), strict=True)):
        prompt, completion = rows[row]
        real = [t for t, m in zip(ids, mask, strict=True) if m]
        assert real == list(prompt) + list(completion)  # exactly the sampled ids, nothing re-tokenised
        assert ids[3 : 3 + len(completion)] == list(completion)  # completions start at the same column
    # Logits exist only for the completion block (C + 1 = 5 positions): prompt tokens are never predicted.
    logits = seen["logits"]  # (B, C + 1, V)
    assert logits.shape[:2] == (4, 5)
    grad_rows = logits.grad.abs().sum(-1)  # (B, C + 1)
    lengths = [len(c) for _, c in rows]
    for row, length in enumerate(lengths):
        assert (grad_rows[row, :length] > 0).all()  # every completion token is trained on
        assert (grad_rows[row, length:] == 0).all()  # padding and the position after the last token: exactly 0


def test_completion_logprobs_equal_a_full_forward(tiny_llama_dir: Path) -> None:
    from espalier.training.batch import build_sequences, collate

    trainer = _trainer(tiny_llama_dir, temperature=0.7)
    sequences, _ = build_sequences(GROUPS, [0.0] * 4, None, None)
    mb = collate(sequences, range(4), trainer.pad_id)
    trainer.model.eval()
    with torch.no_grad():
        ours = trainer._logprobs(mb)  # (B, C)
        for row, s in enumerate(sequences):
            ids = torch.tensor([list(s.prompt_ids) + list(s.completion_ids)])
            logp = torch.log_softmax(trainer.model(input_ids=ids).logits[0] / 0.7, -1)  # (T, V), unpadded
            p = len(s.prompt_ids)
            expected = [logp[p - 1 + t, tok].item() for t, tok in enumerate(s.completion_ids)]
            assert ours[row, : len(expected)].tolist() == pytest.approx(expected, abs=1e-5)


def _with_sampler_logprobs(value: float) -> list[Group]:
    return [
        Group(tuple(Sample(s.prompt_ids, s.completion_ids, s.reward, logprobs=(value,) * len(s.completion_ids))
                    for s in g.samples))
        for g in GROUPS
    ]


@pytest.mark.parametrize("correction", [True, False])
def test_sampler_logprobs_never_change_the_ratio_only_the_capped_weight(tiny_llama_dir: Path, correction: bool) -> None:
    """Sampler log-probs of -50 (a wildly different sampler): ratios stay exactly 1, nothing is clipped;
    with the correction every token's weight min(exp(logp + 50), 2) is capped at 2, so the loss doubles."""
    trainer = _trainer(tiny_llama_dir, per_device_train_batch_size=4, loss_type="dapo",
                       vllm_importance_sampling_correction=correction)
    [metrics] = trainer.train_step(_with_sampler_logprobs(-50.0))
    assert metrics.extra["ratio_max_deviation"] == 0.0
    assert metrics.clip_ratio_high == 0.0 and metrics.clip_ratio_low == 0.0
    assert metrics.loss == pytest.approx((2.0 if correction else 1.0) * _first_step_hand_loss("dapo", 4), abs=1e-6)
    assert metrics.extra["mismatch_tokens"] == 10
    assert metrics.extra["mismatch_share_over_0.1"] == 1.0
    assert metrics.extra["mismatch_tis_capped_share"] == (1.0 if correction else 0.0)
    assert metrics.extra["mismatch_mean_abs_logprob"] > 40


@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_later_optimizer_batches_use_the_trainers_own_old_logprobs(tiny_llama_dir: Path, dropout: float) -> None:
    """Four optimizer batches at lr 0: the pre-update forward is the 'old' policy, so every ratio is 1;
    with LoRA dropout too, because 'old' and the policy forward share each micro-batch's dropout masks."""
    lora = NO_DROPOUT | {"lora_dropout": dropout}
    trainer = _trainer(tiny_llama_dir, per_device_train_batch_size=1, learning_rate=0.0, lora_config=lora)
    with torch.no_grad():  # a trained adapter (B = 0 at init would hide the dropout)
        for name, weight in trainer.model.named_parameters():
            if "lora_B" in name:
                weight.normal_(0.0, 0.5)
    metrics = trainer.train_step(_with_sampler_logprobs(-3.0))
    assert len(metrics) == 4
    assert max(m.extra["ratio_max_deviation"] for m in metrics) < 1e-6
    assert all(m.clip_ratio_low == 0.0 and m.clip_ratio_high == 0.0 for m in metrics)


def test_every_sample_is_trained_and_max_steps_caps(tiny_llama_dir: Path) -> None:
    groups = GROUPS * 3  # 12 sequences, optimizer batches of 5 -> 5, 5, 2
    trainer = _trainer(tiny_llama_dir, per_device_train_batch_size=5, max_steps=4, beta=0.1)
    first = trainer.train_step(groups)
    assert [m.num_sequences for m in first] == [5, 5, 2] and trainer.optimizer_steps == 3
    assert [m.step for m in first] == [1, 2, 3] and first[1].kl > 0
    second = trainer.train_step(groups)
    assert [m.num_sequences for m in second] == [5] and trainer.optimizer_steps == 4
    assert second[-1].extra["max_steps_reached"] == 1.0 and second[-1].extra["sequences_not_trained"] == 7
    third = trainer.train_step(groups)
    assert trainer.optimizer_steps == 4 and third[0].num_sequences == 0
    assert third[0].extra["sequences_not_trained"] == 12


def test_long_prompts_are_dropped_and_long_completions_cut_counted(tiny_llama_dir: Path) -> None:
    """Group a's prompts (3 tokens) are over max_prompt_length 2: dropped, never trained on a cut prompt."""
    trainer = _trainer(tiny_llama_dir, per_device_train_batch_size=4, max_prompt_length=2, max_completion_length=3)
    [metrics] = trainer.train_step(GROUPS)
    assert metrics.extra["dropped_long_prompts"] == 2 and metrics.extra["truncated_completions"] == 1
    assert metrics.num_sequences == 2 and metrics.completion_length_max == 3
    assert metrics.extra["completion_tokens"] == 6


@pytest.mark.parametrize("options", [{"bf16": True}, {"gradient_checkpointing": True, "beta": 0.05}])
def test_bf16_and_checkpointing_train(tiny_llama_dir: Path, options: dict) -> None:
    trainer = _trainer(tiny_llama_dir, per_device_train_batch_size=2, **options)
    before = torch.cat([p.detach().reshape(-1).clone() for p in trainer.params])
    metrics = trainer.train_step(GROUPS)
    after = torch.cat([p.detach().reshape(-1) for p in trainer.params])
    assert all(p.dtype == torch.float32 for p in trainer.params)
    assert metrics[0].grad_norm > 0 and not torch.equal(before, after)


def test_schedulers_warm_up_and_decay(tiny_llama_dir: Path) -> None:
    trainer = _trainer(
        tiny_llama_dir, per_device_train_batch_size=1, lr_scheduler_type="linear", warmup_steps=2, max_steps=6
    )
    lrs = [m.learning_rate for m in trainer.train_step(GROUPS)]
    assert lrs == pytest.approx([0.0, 5e-3, 1e-2, 1e-2 * 3 / 4])
    with pytest.raises(ValueError, match="max_steps"):
        _trainer(tiny_llama_dir, lr_scheduler_type="cosine")
    with pytest.raises(ValueError, match="num_train_steps"):
        _trainer(tiny_llama_dir, warmup_ratio=0.5)


def test_warmup_ratio_without_max_steps_spans_the_planned_updates(tiny_llama_dir: Path) -> None:
    """num_train_steps 2 GRPO steps x 4 updates (4 sequences, batches of 1) = 8 updates; ratio 0.5 -> 4 warm-up."""
    trainer = _trainer(tiny_llama_dir, per_device_train_batch_size=1, lr_scheduler_type="constant_with_warmup",
                       warmup_ratio=0.5, num_train_steps=2)
    lrs = [m.learning_rate for m in trainer.train_step(GROUPS) + trainer.train_step(GROUPS)]
    assert trainer.schedule_total == 8
    assert lrs == pytest.approx([0.0, 2.5e-3, 5e-3, 7.5e-3, 1e-2, 1e-2, 1e-2, 1e-2])


def test_skipping_zero_advantage_sequences_changes_nothing_but_time(tiny_llama_dir: Path) -> None:
    """A flat group (all rewards equal) has zero gradient: skipping its compute gives the same update."""
    from espalier.types import Group, Sample

    groups = [
        Group((Sample((1, 2, 3), (4, 5), 1.0), Sample((1, 2, 3), (6, 7, 8), 0.0))),
        Group((Sample((9, 10), (11,), 0.5), Sample((9, 10), (12, 13), 0.5))),  # no variance
    ]
    config = TrainConfig.from_kwargs({"per_device_train_batch_size": 2, "learning_rate": 1e-2, "loss_type": "dapo",
                                      "lora_config": {"lora_dropout": 0.0}})  # dropout masks would differ in RNG use
    weights = []
    for skip in (True, False):
        trainer = GRPOTrainer(tiny_llama_dir, config)
        trainer.skip_zero_advantage = skip
        trainer.train_step(groups)
        trainer.train_step(groups)
        weights.append({n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad})
    for name, value in weights[0].items():
        torch.testing.assert_close(value, weights[1][name], rtol=0, atol=1e-6)


def test_a_non_finite_gradient_never_reaches_the_weights(tiny_llama_dir: Path) -> None:
    trainer = _trainer(tiny_llama_dir, per_device_train_batch_size=4)
    lora = {n: p for n, p in trainer.model.named_parameters() if "lora_" in n}
    before = {n: p.detach().clone() for n, p in lora.items()}
    hook = next(iter(lora.values())).register_hook(lambda g: g * float("nan"))
    [metrics] = trainer.train_step(GROUPS)
    assert metrics.extra["skipped_nonfinite"] == 1.0 and trainer.optimizer_steps == 1
    assert json.loads(json.dumps(metrics.to_dict(), allow_nan=False))["grad_norm"] is None  # what the server sends
    assert all(torch.equal(p, before[n]) for n, p in lora.items())
    hook.remove()
    [metrics] = trainer.train_step(GROUPS)
    assert metrics.extra["skipped_nonfinite"] == 0.0
    assert all(torch.isfinite(p).all() for p in lora.values())
    assert any(not torch.equal(p, before[n]) for n, p in lora.items())
