"""The lecture's exercises 1-3 on its check setup.

Exercise 1 breaks the forward pass into named intermediates and backpropagates through each one
by hand, one line of math at a time, in reverse order. Its reference solution is ``lecture``
(the learner's template, ``learning/templates/exercise1.py``, is that code with the answers
fenced as blanks; a test keeps the two the same). Exercises 2 and 3 replace the
cross-entropy and batchnorm stretches with their fused gradients, the layers' own backward.
``run_check`` compares all of them with autograd and feeds ``backprop-ninja check``.

Dimension letters: n batch, T block_size, E n_embd, H n_hidden, V vocab size.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..data import Dataset, Vocab, default_data_path
from ..models import mlp
from ..models.base import Params
from ..nn.losses import cross_entropy_backward, cross_entropy_forward
from ..nn.normalisation import batchnorm_backward, batchnorm_forward, check_batch_size
from . import lecture
from .gradcheck import Comparison, compare

# The 26 tensors of exercise 1, in the order the backward pass reaches them (the lecture's cmp order).
EXERCISE1_NAMES = (
    "logprobs", "probs", "counts_sum_inv", "counts_sum", "counts", "norm_logits", "logit_maxes",
    "logits", "h", "W2", "b2", "hpreact", "bngain", "bnbias", "bnraw", "bnvar_inv", "bnvar",
    "bndiff2", "bndiff", "bnmeani", "hprebn", "embcat", "W1", "b1", "emb", "C",
)


@dataclass
class CheckSetup:
    """The lecture's check: its data split, a freshly initialised model and one seeded batch."""

    cfg: mlp.Config
    params: Params
    Xb: Tensor  # n x T
    Yb: Tensor  # n
    vocab: Vocab


def lecture_check_setup(path: str | Path | None = None, n_hidden: int = 64, batch_size: int = 32,
                        n_embd: int = 10, block_size: int = 3, seed: int = mlp.LECTURE_SEED,
                        dtype: torch.dtype = torch.float32) -> CheckSetup:
    data = Dataset.load(path or default_data_path(), block_size=block_size)
    cfg = mlp.Config(data.vocab.size, block_size, n_embd, n_hidden)
    # The lecture's order: the MLP's tensors, then the check batch, from one generator. Its bngain
    # and bnbias came from the unseeded global RNG; here they come from the same generator, after
    # the batch, so the batch is the lecture's and everything is reproducible.
    g = torch.Generator().manual_seed(seed)
    params = mlp.init_mlp_params(cfg, g)
    Xtr, Ytr = data.splits["train"]
    ix = torch.randint(0, Xtr.shape[0], (batch_size,), generator=g)
    params = {**params, **mlp.init_batchnorm_params(cfg, g)}
    params = {k: v.to(dtype) for k, v in params.items()}
    return CheckSetup(cfg, params, Xtr[ix], Ytr[ix], data.vocab)


def atomic_forward(p: Params, Xb: Tensor, Yb: Tensor) -> dict[str, Tensor]:
    """The forward pass in the lecture's small steps; every intermediate by name."""
    check_batch_size(Xb.shape[0])
    return lecture.forward(p, Xb, Yb)


def atomic_backward(p: Params, Xb: Tensor, Yb: Tensor, t: dict[str, Tensor]) -> dict[str, Tensor]:
    """Exercise 1: the gradient of the loss for all 26 tensors, by hand."""
    return lecture.backward(Xb=Xb, Yb=Yb, **p, **t)


def fused_dlogits(logits: Tensor, Yb: Tensor) -> Tensor:
    """Exercise 2: dlogits = (softmax(logits) - onehot(Yb)) / n."""
    _, cache = cross_entropy_forward(logits, Yb)
    return cross_entropy_backward(1.0, cache)[0]


def fused_dhprebn(hprebn: Tensor, bngain: Tensor, dhpreact: Tensor) -> Tensor:
    """Exercise 3: dhprebn from dhpreact through batchnorm in one formula."""
    _, cache = batchnorm_forward(hprebn, bngain, torch.zeros_like(bngain))
    return batchnorm_backward(dhpreact, cache)[0]


def autograd_reference(p: Params, Xb: Tensor, Yb: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The intermediates and autograd's gradient of the loss for each of the 26 tensors."""
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in p.items()}
    with torch.enable_grad():
        t = atomic_forward(leaves, Xb, Yb)
        for v in t.values():
            v.retain_grad()
        t["loss"].backward()
    grads = {name: (leaves[name] if name in leaves else t[name]).grad for name in EXERCISE1_NAMES}
    values = {k: v.detach() for k, v in t.items()}
    return values, grads


@dataclass
class CheckReport:
    loss: float
    tables: dict[str, list[Comparison]]  # exercise1, exercise2, exercise3

    @property
    def ok(self) -> bool:
        return all(r.approx for rows in self.tables.values() for r in rows)


def run_check(setup: CheckSetup) -> CheckReport:
    """Exercises 1-3 against autograd, on one setup (the whole model's backward is
    ``checking.models``' job)."""
    p, Xb, Yb = setup.params, setup.Xb, setup.Yb
    t, ref = autograd_reference(p, Xb, Yb)
    mine = atomic_backward(p, Xb, Yb, t)
    ex1 = [compare(name, mine[name], ref[name]) for name in EXERCISE1_NAMES]
    ex2 = [compare("logits", fused_dlogits(t["logits"], Yb), ref["logits"])]
    ex3 = [compare("hprebn", fused_dhprebn(t["hprebn"], p["bngain"], ref["hpreact"]), ref["hprebn"])]
    return CheckReport(float(t["loss"]), {"exercise1": ex1, "exercise2": ex2, "exercise3": ex3})

