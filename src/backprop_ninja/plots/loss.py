"""The loss curve a train run writes beside its model (loss.png)."""

from __future__ import annotations

from pathlib import Path

import torch
from matplotlib.figure import Figure

from .figure import save


def write_loss_plot(path: Path, metrics: list[dict], title: str) -> None:
    """log10 of the training loss averaged over blocks of 1000 steps (fewer for short runs),
    and the val loss where it was measured: a gap that opens between them is overfitting."""
    if not metrics:
        return
    losses = [r["loss"] for r in metrics]
    block = 1000 if len(losses) >= 2000 else max(1, len(losses) // 20)
    t = torch.tensor(losses[: len(losses) // block * block], dtype=torch.float64).log10()
    curve = t.view(-1, block).mean(1)
    fig = Figure(figsize=(8, 4.5))
    ax = fig.add_subplot()
    ax.plot((torch.arange(len(curve)) * block + block / 2).tolist(), curve.tolist(),
            label=f"train (mean over {block} steps)")
    val = [(r["step"] + 1, r["val_loss"]) for r in metrics if "val_loss" in r]
    if val:
        steps, values = zip(*val)
        ax.plot(steps, torch.tensor(values, dtype=torch.float64).log10().tolist(), "o-",
                label="val (batchnorm calibrated on the training set)")
    ax.set_xlabel("step")
    ax.set_ylabel("log10 loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save(fig, path)
