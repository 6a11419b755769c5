"""The gradient of the logits on the lecture's check batch, as a picture (exercise 2's answer).

Dimension letters: n batch, V vocab size.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor

from ..checking import atomic
from ..data import BOUNDARY, Vocab, default_data_path
from ..models import mlp
from .figure import save



@dataclass
class DlogitsPlot:
    path: Path
    dlogits: Tensor  # n x V, what the image shows
    targets: Tensor  # n, the correct class of each row


def check_batch_dlogits(data_path: str | Path | None = None) -> tuple[Tensor, Tensor, Vocab]:
    """dlogits of the lecture's check batch at initialisation (exercise 2's answer)."""
    path = data_path or default_data_path()
    setup = atomic.lecture_check_setup(path)
    with torch.no_grad():
        logits = mlp.forward(setup.params, setup.Xb).logits
    return atomic.fused_dlogits(logits, setup.Yb), setup.Yb, setup.vocab


def plot_dlogits(out: str | Path, data_path: str | Path | None = None,
                 force: bool = False) -> DlogitsPlot:
    dlogits, Yb, vocab = check_batch_dlogits(data_path)
    n, V = dlogits.shape
    fig = Figure(figsize=(10, 9))
    ax = fig.add_subplot()
    image = ax.imshow(dlogits.numpy(), cmap="gray", aspect="auto")
    ax.scatter(Yb.numpy(), np.arange(n), s=60, facecolors="none", edgecolors="tab:red",
               label="correct next character: pulled up by (1 - p)/n (dark)")
    ax.set_xticks(range(V), [BOUNDARY, *vocab.chars])
    ax.set_xlabel("next character (logit)")
    ax.set_ylabel(f"example of the check batch (n = {n})")
    ax.set_title("dlogits = (softmax(logits) - onehot(y)) / n, at initialisation\n"
                 "every wrong class is pushed down by p/n (light), the correct one pulled up "
                 "(dark):\neach row sums to 0 "
                 f"(largest |row sum| here: {dlogits.sum(1).abs().max().item():.1e})", fontsize=10)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.08), fontsize=9, frameon=False)
    fig.colorbar(image, ax=ax, label="dloss / dlogit")
    fig.tight_layout()
    return DlogitsPlot(save(fig, out, force), dlogits, Yb)
