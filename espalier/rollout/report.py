"""What a GRPO step reports: its metrics, a one-line progress summary, and sampled completions."""

from __future__ import annotations

from typing import Any

from espalier.types import Group, Rollout

MAX_FAILED_STEPS = 3  # consecutive steps whose runs failed so that nothing trained: the run stops
TRAIN_KEYS = ("loss", "kl", "grad_norm", "learning_rate", "clip_ratio_low", "clip_ratio_high", "tokens_per_second")
LIMIT_KEYS = ("dropped_long_prompts", "truncated_completions")
MISMATCH_KEYS = ("mismatch_mean_abs_logprob", "mismatch_share_over_0.1", "mismatch_tis_capped_share")


def _is_error(rollout: Rollout) -> bool:
    """Failed for a reason other than the output format or the metric (transport, the program itself)."""
    return bool(rollout.failure) and rollout.failure.startswith("error")


def failed_for_errors(rollouts: list[Rollout], groups: list[Group]) -> bool:
    """No group can train (none has reward variance) and at least half of the runs failed with an error."""
    trainable = any(len({s.reward for s in g.samples}) > 1 for g in groups)
    return not trainable and sum(map(_is_error, rollouts)) * 2 >= max(len(rollouts), 1)


def first_error(rollouts: list[Rollout]) -> str:
    return next((r.failure for r in rollouts if _is_error(r)), "no error recorded")


def step_metrics(rollouts: list[Rollout], groups: list[Group], train: list[dict], t_roll: float, t_train: float):
    n = max(len(rollouts), 1)
    rewards = [r.reward for r in rollouts]
    mean = sum(rewards) / n
    flat = [g for g in groups if len({s.reward for s in g.samples}) == 1]
    metrics = {
        "reward/mean": mean,
        "reward/std": (sum((r - mean) ** 2 for r in rewards) / n) ** 0.5,
        "rollouts/format_failure_rate": sum(bool(r.failure and r.failure.startswith("format")) for r in rollouts) / n,
        "rollouts/error_rate": sum(bool(r.failure and not r.failure.startswith("format")) for r in rollouts) / n,
        "rollouts/errors": float(sum(map(_is_error, rollouts))),
        "rollouts/calls": float(sum(len(r.calls) for r in rollouts)),
        "rollouts/json_fallback_calls": float(sum(r.fallback_calls for r in rollouts)),  # not trained: capture.py
        "groups/count": float(len(groups)),
        "groups/sequences": float(sum(len(g.samples) for g in groups)),
        "groups/no_variance_share": len(flat) / max(len(groups), 1),
        "time/rollouts_s": t_roll,
        "time/train_s": t_train,
        "train/optimizer_steps": float(sum(m.get("num_sequences", 0) > 0 for m in train)),
    }
    for key in TRAIN_KEYS:
        values = [m[key] for m in train if key in m]
        if values:
            metrics[f"train/{key}"] = sum(values) / len(values)
    extras = [m.get("extra", {}) for m in train]
    _add_mismatch(metrics, extras)
    if extras:
        metrics["train/ratio_max_deviation"] = max(e.get("ratio_max_deviation", 0.0) for e in extras)
        for key in LIMIT_KEYS:  # the same counts are attached to every optimizer step of a train_step
            metrics[f"train/{key}"] = extras[0].get(key, 0.0)
        masked = [e.get("masked_truncated_completions") for e in extras]
        if any(v is not None for v in masked):
            metrics["train/masked_truncated_completions"] = float(max(v or 0.0 for v in masked))  # the same on each
    return metrics


def _add_mismatch(metrics: dict[str, float], extras: list[dict[str, float]]) -> None:
    """The sampler/trainer gap over the step, weighted by each optimizer step's tokens with sampler log-probs."""
    tokens = sum(e.get("mismatch_tokens", 0.0) for e in extras)
    if tokens:
        for key in MISMATCH_KEYS:
            metrics[f"train/{key}"] = sum(e.get(key, 0.0) * e.get("mismatch_tokens", 0.0) for e in extras) / tokens


def step_line(step: int, total: int, m: dict[str, float]) -> str:
    loss = f"loss {m['train/loss']:+.4f} " if "train/loss" in m else ""
    gap = m.get("train/mismatch_mean_abs_logprob")
    mismatch = f"sampler gap {gap:.3f} " if gap is not None else ""
    errors = f"errors {int(m['rollouts/errors'])}, " if m.get("rollouts/errors") else ""
    if m.get("train/dropped_long_prompts"):
        errors += f"{int(m['train/dropped_long_prompts'])} seqs dropped (prompt over max_prompt_length), "
    fallback = m.get("rollouts/json_fallback_calls", 0.0)
    loss += f"{int(fallback)} JSON-fallback calls not trained, " if fallback else ""
    return (
        f"step {step}/{total}: reward {m['reward/mean']:.3f} (std {m['reward/std']:.3f}), "
        f"format failures {100 * m['rollouts/format_failure_rate']:.0f}%, {errors}{int(m['groups/count'])} groups / "
        f"{int(m['groups/sequences'])} seqs, {loss}{mismatch}rollouts {m['time/rollouts_s']:.0f}s, "
        f"train {m['time/train_s']:.0f}s"
    )


def duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m{secs:02d}s"


def completion_rows(rollouts: list[Rollout], limit: int = 24) -> list[dict[str, Any]]:
    rows = []
    for r in rollouts[:limit]:
        for c in r.calls:
            rows.append(
                {
                    "example": r.example_index,
                    "predictor": c.predictor,
                    "invocation": c.invocation,
                    "reward": r.reward,
                    "failure": r.failure or "",
                    "completion": c.completion_text[:2000],
                }
            )
    return rows
