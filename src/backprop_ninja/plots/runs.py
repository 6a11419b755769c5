"""Pictures of a trained run: its diagnostics (the batchnorm lecture's histograms and the
update-to-data ratios over training) and a transformer's attention maps.

Dimension letters: n batch, H hidden width, V vocab size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor

from ..data import BOUNDARY, Dataset
from ..errors import UserError
from .. import models
from ..models.base import ModelSpec, Params, Stats
from ..rundir import load_run
from .figure import save

SATURATED = 0.97  # |tanh| above this passes almost no gradient back (the lecture's threshold)


# ---------------------------------------------------------------------------------------------
# a trained run's diagnostics (the batchnorm lecture's pictures)

class RunLike(Protocol):
    """What the diagnostics read from a loaded run (``workdir.Run``)."""

    spec: ModelSpec
    cfg: object
    params: Params
    stats: Stats
    data: Dataset
    metrics: list[dict]


def load_run_for_plot(workdir: str | Path) -> RunLike:
    workdir = Path(workdir)
    if not workdir.is_dir():
        raise UserError(f"{workdir} is not a run's work directory; train one with "
                        f"`backprop-ninja train -o {workdir}`")
    try:
        return load_run(workdir, checkpoint=True)
    except OSError as e:
        raise UserError(f"cannot read the run in {workdir}: {e.strerror or e}") from None


@dataclass
class Diagnostics:
    """One training batch through the trained model, in training mode, and its gradients."""

    activations: dict[str, Tensor]       # the model's named activations, e.g. hpreact, h
    activation_grads: dict[str, Tensor]  # their gradients, d<name>
    param_grads: Params
    params: Params
    ud: dict[str, list[tuple[int, float]]]  # param name -> (step, log10 update:data)


def diagnose_run(run: RunLike, batch_size: int = 32, seed: int = 0) -> Diagnostics:
    Xtr, Ytr = run.data.splits["train"]
    g = torch.Generator().manual_seed(seed)
    ix = torch.randint(0, Xtr.shape[0], (batch_size,), generator=g)
    act_grads: dict[str, Tensor] = {}
    with torch.no_grad():
        result = run.spec.forward(run.params, Xtr[ix], Ytr[ix])
        grads = run.spec.backward(result.cache, act_grads)
    return Diagnostics(result.acts, {"d" + k: v for k, v in act_grads.items() if k in result.acts},
                       grads, run.params, update_ratios(run.metrics))


def update_ratios(metrics: list[dict]) -> dict[str, list[tuple[int, float]]]:
    series: dict[str, list[tuple[int, float]]] = {}
    for row in metrics:
        for name, value in (row.get("ud") or {}).items():
            if value is not None and math.isfinite(value):
                series.setdefault(name, []).append((row["step"], value))
    return series


def plot_diagnostics(run: RunLike, out: str | Path, force: bool = False) -> Diagnostics:
    d = diagnose_run(run)
    fig = Figure(figsize=(14, 10))
    axes = fig.subplots(2, 2)
    activation_panel(axes[0][0], d)
    activation_grad_panel(axes[0][1], d)
    param_grad_panel(axes[1][0], d)
    ud_panel(axes[1][1], d)
    fig.suptitle(f"diagnostics of a trained {run.spec.name}, one training batch in training mode")
    fig.tight_layout()
    save(fig, out, force)
    return d


def histogram(ax, values: Tensor, label: str) -> None:
    # densities, so that tensors of different sizes compare
    counts, edges = np.histogram(values.detach().flatten().numpy(), bins=60, density=True)
    ax.plot((edges[:-1] + edges[1:]) / 2, counts, label=label)


def activation_panel(ax, d: Diagnostics) -> None:
    for name, act in d.activations.items():
        label = f"{name}: mean {act.mean():+.2f}, std {act.std():.2f}"
        if act.abs().max() <= 1:  # a tanh's output: how much of it is saturated
            label += f", saturated (|x| > {SATURATED}) {(act.abs() > SATURATED).float().mean():.1%}"
        histogram(ax, act, label)
    ax.set_title("activations: a wide pre-activation saturates tanh, whose gradient then vanishes")
    if d.activations:
        ax.legend(fontsize=8)


def activation_grad_panel(ax, d: Diagnostics) -> None:
    for name, grad in d.activation_grads.items():
        histogram(ax, grad, f"{name}: mean {grad.mean():+.1e}, std {grad.std():.1e}")
    ax.set_title("gradients of the activations (after tanh: times 1 - h^2)")
    if d.activation_grads:
        ax.legend(fontsize=8)


def param_grad_panel(ax, d: Diagnostics) -> None:
    for name, param in d.params.items():
        if param.ndim != 2:  # the weight matrices; biases and gains are small vectors
            continue
        grad = d.param_grads[name]
        ratio = grad.std().item() / max(param.std().item(), 1e-30)
        histogram(ax, grad, f"{name} {tuple(param.shape)}: grad std {grad.std():.1e}, "
                            f"grad:data {ratio:.1e}")
    ax.set_title("gradients of the weights, per layer")
    ax.legend(fontsize=8)


def ud_panel(ax, d: Diagnostics) -> None:
    for name in d.params:
        points = d.ud.get(name)
        if points:
            steps, values = zip(*points)
            ax.plot(steps, values, label=name)
    ax.axhline(-3, color="black", linestyle="--", linewidth=1, label="1e-3, a rough guide")
    ax.set_xlabel("step")
    ax.set_ylabel("log10( std(lr * grad) / std(param) )")
    ax.set_title("update-to-data ratio over training (a bias under batchnorm has ~0 gradient)")
    if not d.ud:
        ax.text(0.5, 0.5, "no update-to-data records in metrics.jsonl\n(train with --diag-every N)",
                ha="center", va="center", transform=ax.transAxes)
    ax.legend(fontsize=8, ncol=2)


# ---------------------------------------------------------------------------------------------
# attention maps of a trained transformer

def plot_attention(run: RunLike, out: str | Path, items: int = 2, force: bool = False
                   ) -> list[Tensor]:
    """A panel per layer and head for each of the first ``items`` validation items: row t is
    where position t looks (its attention weights over positions 0..t). Returns the maps."""
    if run.spec.attention_maps is None:
        with_attention = ", ".join(m.name for m in models.MODELS.values() if m.attention_maps)
        raise UserError(f"plot attention needs a model with attention ({with_attention}); the run "
                        f"is a {run.spec.name}")
    X, Y = run.data.splits["val"]
    X, Y = X[:items], Y[:items]
    with torch.no_grad():
        maps = run.spec.attention_maps(run.spec.forward(run.params, X, Y, run.stats).cache)
    n_layer, n_head = len(maps), maps[0].shape[1]
    fig = Figure(figsize=(2.6 * n_head, 2.6 * n_layer * len(X) + 0.6))
    axes = fig.subplots(n_layer * len(X), n_head, squeeze=False)
    for i, x in enumerate(X):
        length = int((Y[i] != -1).sum())  # the item and its end token
        labels = [BOUNDARY] + [run.vocab.decode([int(c)]) for c in x[1:length]]
        for layer, att in enumerate(maps):
            for head in range(n_head):
                ax = axes[i * n_layer + layer][head]
                ax.imshow(att[i, head, :length, :length].numpy(), cmap="viridis", vmin=0, vmax=1)
                ax.set_xticks(range(length), labels, fontsize=7)
                ax.set_yticks(range(length), labels, fontsize=7)
                ax.set_title(f"{''.join(labels[1:])}: layer {layer}, head {head}", fontsize=8)
    fig.suptitle("attention weights: row t is how position t\nweighs positions 0..t (nothing above "
                 "the diagonal)", fontsize=9)
    fig.tight_layout()
    save(fig, out, force)
    return maps
