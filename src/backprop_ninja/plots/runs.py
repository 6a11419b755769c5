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
from ..nn.losses import IGNORE_INDEX
from ..rundir import article, load_run
from .figure import save

NO_CHANGE = -29.0  # log10 ratios at or below this are the 1e-30 floor: no update at all
MAX_UD_SERIES = 10  # above this many parameters, the update-to-data panel shows the matrices only
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
    batchnorm: bool = False  # whether the model has batchnorm layers
    # whether ``activations`` are the output logits (and their gradients), for a model that has
    # no hidden activations to show (the bigram, the transformer)
    logits: bool = False


def diagnose_run(run: RunLike, batch_size: int = 32, seed: int = 0) -> Diagnostics:
    Xtr, Ytr = run.data.splits["train"]
    g = torch.Generator().manual_seed(seed)
    ix = torch.randint(0, Xtr.shape[0], (batch_size,), generator=g)
    act_grads: dict[str, Tensor] = {}
    X, Y = Xtr[ix], Ytr[ix]
    with torch.no_grad():
        result = run.spec.forward(run.params, X, Y)
        grads = run.spec.backward(result.cache, act_grads)
    acts = dict(result.acts)
    act_grads = {"d" + k: v for k, v in act_grads.items() if k in acts}
    logits = not acts
    if logits:  # nothing hidden to show: the output logits and their gradient
        acts = {"logits": result.logits}
        act_grads = {"dlogits": cross_entropy_dlogits(result.logits, Y)}
    return Diagnostics(acts, act_grads, grads, run.params, update_ratios(run.metrics),
                       batchnorm=bool(result.norm_inputs), logits=logits)


def cross_entropy_dlogits(logits: Tensor, Y: Tensor) -> Tensor:
    """d(mean cross-entropy)/d logits over the targets that count (padding, -1, has none):
    (softmax - onehot) / count, by hand."""
    shape, V = logits.shape, logits.shape[-1]
    logits, Y = logits.reshape(-1, V), Y.reshape(-1)
    valid = Y != IGNORE_INDEX
    d = torch.softmax(logits, dim=1)
    d[valid, Y[valid]] -= 1
    d[~valid] = 0
    return (d / valid.sum().clamp_min(1)).view(shape)


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
    fig.suptitle(f"diagnostics of a trained {run.spec.name} (one training batch in training mode)")
    fig.tight_layout()
    save(fig, out, force)
    return d


def histogram(ax, values: Tensor, label: str) -> None:
    # densities, so that tensors of different sizes compare
    counts, edges = np.histogram(values.detach().flatten().numpy(), bins=60, density=True)
    ax.plot((edges[:-1] + edges[1:]) / 2, counts, label=label)


def is_tanh_output(act: Tensor) -> bool:
    return bool(act.abs().max() <= 1)


def activation_panel(ax, d: Diagnostics) -> None:
    tanh = False
    for name, act in d.activations.items():
        label = f"{name}: mean {act.mean():+.2f}, std {act.std():.2f}"
        if not d.logits and is_tanh_output(act):  # a tanh's output: how much is saturated
            tanh = True
            label += f", saturated (|x| > {SATURATED}) {(act.abs() > SATURATED).float().mean():.1%}"
        histogram(ax, act, label)
    if d.logits:
        title = "output logits (this model has no hidden activations to show)"
    elif tanh:
        title = "activations: a wide pre-activation saturates tanh, whose gradient then vanishes"
    else:
        title = "hidden activations"
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)


def activation_grad_panel(ax, d: Diagnostics) -> None:
    for name, grad in d.activation_grads.items():
        histogram(ax, grad, f"{name}: mean {grad.mean():+.1e}, std {grad.std():.1e}")
    if d.logits:
        title = "gradient of the logits: (softmax - onehot) / n"
    elif any(not d.logits and is_tanh_output(a) for a in d.activations.values()):
        title = "gradients of the activations (through tanh: times 1 - h^2)"
    else:
        title = "gradients of the activations"
    ax.set_title(title, fontsize=10)
    if d.activation_grads:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no activation gradients to show", ha="center", va="center",
                transform=ax.transAxes)


def param_grad_panel(ax, d: Diagnostics) -> None:
    for name, param in d.params.items():
        if param.ndim != 2:  # the weight matrices; biases and gains are small vectors
            continue
        grad = d.param_grads[name]
        ratio = grad.std().item() / max(param.std().item(), 1e-30)
        histogram(ax, grad, f"{name} {tuple(param.shape)}: grad std {grad.std():.1e}, "
                            f"grad:data {ratio:.1e}")
    ax.set_title("gradients of the weights, per layer", fontsize=10)
    many = sum(p.ndim == 2 for p in d.params.values()) > 6
    ax.legend(fontsize=6 if many else 8)


def ud_panel(ax, d: Diagnostics) -> None:
    drawn, frozen = 0, []
    names = list(d.params)
    if len(names) > MAX_UD_SERIES:  # many small vectors: the weight matrices, as the lecture does
        names = [n for n in names if d.params[n].ndim == 2]
    for name in names:
        # a ratio at the floor (1e-30) is a parameter the steps did not change (a bias under
        # batchnorm): named in a note rather than drawn 27 decades below the others
        points = [(step, v) for step, v in d.ud.get(name, []) if v > NO_CHANGE]
        if d.ud.get(name) and not points:
            frozen.append(name)
        if points:
            steps, values = zip(*points)
            # a run with a few records: markers, so that a single record shows
            ax.plot(steps, values, label=name, marker="o" if len(points) < 20 else None,
                    markersize=4)
            drawn += 1
    title = "update-to-data ratio over training"
    if len(names) < len(d.params):
        title += ", weight matrices"
    elif d.batchnorm:
        title += "\n(a bias before batchnorm has ~0 gradient)"
    ax.set_title(title, fontsize=10)
    if not drawn:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.text(0.5, 0.5, "no update-to-data records in metrics.jsonl\n(the run records one "
                "every --diag-every steps, default 1000;\ntrain longer or with a smaller "
                "--diag-every N)", ha="center", va="center", transform=ax.transAxes)
        return
    ax.axhline(-3, color="black", linestyle="--", linewidth=1, label="1e-3, a rough guide")
    if frozen:
        ax.text(0.02, 0.02, f"not changed by the steps: {', '.join(frozen)}", fontsize=8,
                transform=ax.transAxes)
    ax.set_xlabel("step")
    ax.set_ylabel("log10( std(update) / std(param) )")
    ax.legend(fontsize=6 if drawn > 6 else 8, ncol=2 if drawn > 6 else 1)


# ---------------------------------------------------------------------------------------------
# attention maps of a trained transformer

def plot_attention(run: RunLike, out: str | Path, items: int = 2, force: bool = False
                   ) -> list[Tensor]:
    """A panel per layer and head for each of the first ``items`` validation items: row t is
    where position t looks (its attention weights over positions 0..t). Returns the maps."""
    if run.spec.attention_maps is None:
        with_attention = ", ".join(m.name for m in models.MODELS.values() if m.attention_maps)
        raise UserError(f"plot attention needs a model with attention ({with_attention}); the run "
                        f"is {article(run.spec.name)} {run.spec.name}")
    X, Y = run.data.splits["val"]
    X, Y = X[:items], Y[:items]
    with torch.no_grad():
        maps = run.spec.attention_maps(run.spec.forward(run.params, X, Y, run.stats).cache)
    n_layer, n_head = len(maps), maps[0].shape[1]
    # constrained layout keeps the title above the first row's titles and makes room for the
    # colour bar, which every panel shares (weights are in [0, 1] everywhere)
    fig = Figure(figsize=(2.6 * n_head + 1.2, 2.6 * n_layer * len(X) + 0.8), layout="constrained")
    axes = fig.subplots(n_layer * len(X), n_head, squeeze=False)
    image = None
    for i, x in enumerate(X):
        length = int((Y[i] != -1).sum())  # the item and its end token
        labels = [BOUNDARY] + [run.vocab.decode([int(c)]) for c in x[1:length]]
        for layer, att in enumerate(maps):
            for head in range(n_head):
                ax = axes[i * n_layer + layer][head]
                image = ax.imshow(att[i, head, :length, :length].numpy(), cmap="viridis",
                                  vmin=0, vmax=1)
                ax.set_xticks(range(length), labels, fontsize=7)
                ax.set_yticks(range(length), labels, fontsize=7)
                ax.set_title(f"{''.join(labels[1:])}: layer {layer}, head {head}", fontsize=8)
    fig.suptitle("attention weights: row t is how position t\nweighs positions 0..t (nothing above "
                 "the diagonal)", fontsize=10)
    fig.colorbar(image, ax=axes, shrink=min(1.0, 6 / (n_layer * len(X))), aspect=30,
                 label="attention weight")
    save(fig, out, force)
    return maps
