"""What a GRPO step reports: its metrics, a one-line progress summary, and sampled completions."""

from __future__ import annotations

from typing import Any

from espalier.types import Group, Rollout


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
        "rollouts/calls": float(sum(len(r.calls) for r in rollouts)),
        "rollouts/json_fallback_calls": float(sum(r.fallback_calls for r in rollouts)),  # not trained: capture.py
        "groups/count": float(len(groups)),
        "groups/sequences": float(sum(len(g.samples) for g in groups)),
        "groups/no_variance_share": len(flat) / max(len(groups), 1),
        "time/rollouts_s": t_roll,
        "time/train_s": t_train,
        "train/optimizer_steps": float(len(train)),
    }
    for key in ("loss", "kl", "grad_norm", "learning_rate", "clip_ratio_low", "clip_ratio_high", "tokens_per_second"):
        values = [m[key] for m in train if key in m]
        if values:
            metrics[f"train/{key}"] = sum(values) / len(values)
    masked = [m.get("extra", {}).get("masked_truncated_completions") for m in train]
    if any(v is not None for v in masked):
        metrics["train/masked_truncated_completions"] = float(max(v or 0.0 for v in masked))  # the same on each
    return metrics


def step_line(step: int, total: int, m: dict[str, float]) -> str:
    loss = f"loss {m['train/loss']:+.4f} " if "train/loss" in m else ""
    fallback = m.get("rollouts/json_fallback_calls", 0.0)
    loss += f"{int(fallback)} JSON-fallback calls not trained, " if fallback else ""
    return (
        f"step {step}/{total}: reward {m['reward/mean']:.3f} (std {m['reward/std']:.3f}), "
        f"format failures {100 * m['rollouts/format_failure_rate']:.0f}%, {int(m['groups/count'])} groups / "
        f"{int(m['groups/sequences'])} seqs, {loss}rollouts {m['time/rollouts_s']:.0f}s, train {m['time/train_s']:.0f}s"
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
