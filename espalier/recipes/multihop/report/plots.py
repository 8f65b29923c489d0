"""The report's PNG plots (matplotlib, no display): each curve against steps and against wall time."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never a window, whatever the user's backend

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from espalier.recipes.multihop.report.curves import Curves  # noqa: E402

COLORS = {"reward": "#2b6cb0", "trained": "#2f855a", "recall": "#2b6cb0", "format": "#c05621",
          "rollouts": "#90cdf4", "train": "#2b6cb0", "validation": "#f6ad55"}  # fmt: skip


def write_plots(curves: Curves, directory: Path) -> dict[str, Path]:
    """training.png, validation.png and time.png in `directory`; returns {name: path}."""
    directory.mkdir(parents=True, exist_ok=True)
    makers = {"training": _training, "validation": _validation, "time": _time}
    paths = {}
    for name, make in makers.items():
        fig = make(curves)
        paths[name] = directory / f"{name}.png"
        fig.savefig(paths[name], dpi=100, bbox_inches="tight")
        plt.close(fig)
    return paths


def _axes_pair(rows: int = 1):
    fig, axes = plt.subplots(rows, 2, figsize=(11, 3.2 * rows), squeeze=False)
    for ax in axes[:, 0]:
        ax.set_xlabel("GRPO step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in axes[:, 1]:
        ax.set_xlabel("wall time (min)")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    return fig, axes


def _training(c: Curves):
    fig, axes = _axes_pair(rows=2)
    for col, xs in enumerate(([p.step for p in c.steps], [p.wall_s / 60 for p in c.steps])):
        mean = [p.reward_mean for p in c.steps]
        ax = axes[0, col]
        ax.plot(xs, mean, "o-", color=COLORS["reward"], ms=3, label="mean")
        lo = [p.reward_mean - p.reward_std for p in c.steps]
        hi = [p.reward_mean + p.reward_std for p in c.steps]
        ax.fill_between(xs, lo, hi, color=COLORS["reward"], alpha=0.2, label="± std")
        ax.set_ylabel("train reward")
        ax.legend(loc="best", fontsize=8)
        ax = axes[1, col]
        ax.plot(xs, [100 * p.trained_share for p in c.steps], "o-", color=COLORS["trained"], ms=3)
        ax.set_ylabel("groups that trained (%)")
        ax.set_ylim(-5, 105)
    fig.suptitle("Training: reward of the sampled runs, and the share of groups whose rewards varied")
    return fig


def _validation(c: Curves):
    fig, axes = _axes_pair()
    for col, xs in enumerate(([v.step for v in c.validation], [v.wall_s / 60 for v in c.validation])):
        ax = axes[0, col]
        ax.plot(xs, [100 * v.recall for v in c.validation], "o-", color=COLORS["recall"], label="recall")
        ax.plot(xs, [100 * v.format_failure_rate for v in c.validation], "s--", color=COLORS["format"],
                label="format failures")
        if c.first_search_recall is not None:
            ax.axhline(100 * c.first_search_recall, color=COLORS["recall"], linestyle=":", linewidth=1.2,
                       label="first search only (always-parsing floor)")
        ax.set_ylabel("% of dev examples")
        ax.set_ylim(-5, 105)
        ax.legend(loc="best", fontsize=8)
    fig.suptitle("Validation: dev recall and format failures")
    return fig


def _time(c: Curves):
    fig, ax = plt.subplots(figsize=(11, 3.2))
    val_at = {v.step: v.time_s / 60 for v in c.validation}
    steps = sorted({p.step for p in c.steps} | set(val_at))
    by_step = {p.step: p for p in c.steps}
    roll = [by_step[s].rollouts_s / 60 if s in by_step else 0.0 for s in steps]
    train = [by_step[s].train_s / 60 if s in by_step else 0.0 for s in steps]
    val = [val_at.get(s, 0.0) for s in steps]
    ax.bar(steps, roll, color=COLORS["rollouts"], label="rollouts")
    ax.bar(steps, train, bottom=roll, color=COLORS["train"], label="training")
    ax.bar(steps, val, bottom=[r + t for r, t in zip(roll, train, strict=True)], color=COLORS["validation"],
           label="validation")
    ax.set_xlabel("GRPO step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("minutes")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(loc="best", fontsize=8)
    ax.set_title("Where the time went, per step")
    return fig
