"""The lecture's exercises 1-3 on its check setup.

Exercise 1 breaks the forward pass into named intermediates and backpropagates through each one
by hand, one line of math at a time, in reverse order. Exercises 2 and 3 replace the cross-entropy
and batchnorm stretches with their fused gradients. ``run_check`` compares all of them with
autograd and feeds ``backprop-ninja check``.

Dimension letters: n batch, T block_size, C n_embd, H n_hidden, V vocab size.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from . import layers as L
from . import model as M
from .data import Dataset, Vocab, default_data_path
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

    cfg: M.ModelConfig
    params: M.Params
    Xb: Tensor  # n x T
    Yb: Tensor  # n
    vocab: Vocab


def lecture_check_setup(path: str | Path | None = None, n_hidden: int = 64, batch_size: int = 32,
                        n_embd: int = 10, block_size: int = 3, seed: int = M.LECTURE_SEED,
                        dtype: torch.dtype = torch.float32) -> CheckSetup:
    data = Dataset.load(path or default_data_path(), block_size=block_size)
    cfg = M.ModelConfig(data.vocab.size, block_size, n_embd, n_hidden)
    # The lecture's order: the MLP's tensors, then the check batch, from one generator. Its bngain
    # and bnbias came from the unseeded global RNG; here they come from the same generator, after
    # the batch, so the batch is the lecture's and everything is reproducible.
    g = torch.Generator().manual_seed(seed)
    mlp = M.init_mlp_params(cfg, g)
    Xtr, Ytr = data.splits["train"]
    ix = torch.randint(0, Xtr.shape[0], (batch_size,), generator=g)
    params = {**mlp, **M.init_batchnorm_params(cfg, g)}
    params = {k: v.to(dtype) for k, v in params.items()}
    return CheckSetup(cfg, params, Xtr[ix], Ytr[ix], data.vocab)


def atomic_forward(p: M.Params, Xb: Tensor, Yb: Tensor) -> dict[str, Tensor]:
    """The forward pass in the lecture's small steps; returns every intermediate by name."""
    n = Xb.shape[0]
    L.check_batch_size(n)
    emb = p["C"][Xb]                                       # n x T x C
    embcat = emb.view(n, -1)                               # n x T*C
    hprebn = embcat @ p["W1"] + p["b1"]                    # n x H
    bnmeani = 1 / n * hprebn.sum(0, keepdim=True)          # 1 x H
    bndiff = hprebn - bnmeani                              # n x H
    bndiff2 = bndiff ** 2                                  # n x H
    bnvar = 1 / (n - 1) * bndiff2.sum(0, keepdim=True)     # 1 x H, Bessel's correction
    bnvar_inv = (bnvar + L.BN_EPS) ** -0.5                 # 1 x H
    bnraw = bndiff * bnvar_inv                             # n x H
    hpreact = p["bngain"] * bnraw + p["bnbias"]            # n x H
    h = torch.tanh(hpreact)                                # n x H
    logits = h @ p["W2"] + p["b2"]                         # n x V
    logit_maxes = logits.max(1, keepdim=True).values       # n x 1, for numerical stability
    norm_logits = logits - logit_maxes                     # n x V
    counts = norm_logits.exp()                             # n x V
    counts_sum = counts.sum(1, keepdim=True)               # n x 1
    counts_sum_inv = counts_sum ** -1                      # n x 1
    probs = counts * counts_sum_inv                        # n x V
    logprobs = probs.log()                                 # n x V
    loss = -logprobs[torch.arange(n), Yb].mean()           # scalar
    return dict(emb=emb, embcat=embcat, hprebn=hprebn, bnmeani=bnmeani, bndiff=bndiff,
                bndiff2=bndiff2, bnvar=bnvar, bnvar_inv=bnvar_inv, bnraw=bnraw, hpreact=hpreact,
                h=h, logits=logits, logit_maxes=logit_maxes, norm_logits=norm_logits, counts=counts,
                counts_sum=counts_sum, counts_sum_inv=counts_sum_inv, probs=probs,
                logprobs=logprobs, loss=loss)


def atomic_backward(p: M.Params, Xb: Tensor, Yb: Tensor, t: dict[str, Tensor],
                    embedding: str = "vectorised") -> dict[str, Tensor]:
    """Exercise 1: the gradient of the loss for all 26 tensors, the forward read in reverse.

    ``embedding="loop"`` scatters dC with the lecture's Python double loop (a speed baseline);
    the default does the same scatter-add in one vectorised ``index_add_``.
    """
    n = Xb.shape[0]
    d: dict[str, Tensor] = {}
    # loss = -mean of the picked logprobs: only the picked entries get a gradient, -1/n each
    d["logprobs"] = torch.zeros_like(t["logprobs"])
    d["logprobs"][torch.arange(n), Yb] = -1.0 / n
    d["probs"] = (1.0 / t["probs"]) * d["logprobs"]
    # probs = counts * counts_sum_inv: counts_sum_inv was broadcast over columns -> sum them
    d["counts_sum_inv"] = (t["counts"] * d["probs"]).sum(1, keepdim=True)
    d["counts"] = t["counts_sum_inv"] * d["probs"]
    d["counts_sum"] = -t["counts_sum"] ** -2 * d["counts_sum_inv"]
    # counts_sum = counts.sum(1): a sum forward is a broadcast backward; counts is on two branches
    d["counts"] += torch.ones_like(t["counts"]) * d["counts_sum"]
    d["norm_logits"] = t["counts"] * d["counts"]           # d exp(x) = exp(x)
    d["logits"] = d["norm_logits"].clone()
    d["logit_maxes"] = (-d["norm_logits"]).sum(1, keepdim=True)  # ~0: softmax is shift invariant
    # the max routes its gradient to the argmax position of each row
    V = t["logits"].shape[1]
    d["logits"] += F.one_hot(t["logits"].max(1).indices, num_classes=V) * d["logit_maxes"]
    # logits = h @ W2 + b2
    d["h"] = d["logits"] @ p["W2"].T
    d["W2"] = t["h"].T @ d["logits"]
    d["b2"] = d["logits"].sum(0)
    # d tanh = 1 - h^2; written as a fused multiply-add because that is how autograd's tanh
    # kernel rounds it, which keeps this row (and those after it) bit-exact
    d["hpreact"] = torch.addcmul(torch.ones_like(t["h"]), t["h"], t["h"], value=-1.0) * d["h"]
    # hpreact = bngain * bnraw + bnbias: gain and bias were broadcast over the batch -> sum
    d["bngain"] = (t["bnraw"] * d["hpreact"]).sum(0, keepdim=True)
    d["bnraw"] = p["bngain"] * d["hpreact"]
    d["bnbias"] = d["hpreact"].sum(0, keepdim=True)
    # bnraw = bndiff * bnvar_inv
    d["bndiff"] = t["bnvar_inv"] * d["bnraw"]
    d["bnvar_inv"] = (t["bndiff"] * d["bnraw"]).sum(0, keepdim=True)
    d["bnvar"] = (-0.5 * (t["bnvar"] + L.BN_EPS) ** -1.5) * d["bnvar_inv"]
    d["bndiff2"] = (1.0 / (n - 1)) * torch.ones_like(t["bndiff2"]) * d["bnvar"]
    d["bndiff"] += (2 * t["bndiff"]) * d["bndiff2"]       # bndiff is on two branches
    d["hprebn"] = d["bndiff"].clone()
    d["bnmeani"] = (-d["bndiff"]).sum(0, keepdim=True)
    d["hprebn"] += 1.0 / n * (torch.ones_like(t["hprebn"]) * d["bnmeani"])
    # hprebn = embcat @ W1 + b1
    d["embcat"] = d["hprebn"] @ p["W1"].T
    d["W1"] = t["embcat"].T @ d["hprebn"]
    d["b1"] = d["hprebn"].sum(0)
    d["emb"] = d["embcat"].view(t["emb"].shape)
    d["C"] = embedding_grad_loop(d["emb"], Xb, p["C"]) if embedding == "loop" else \
        L.embedding_backward(d["emb"], L.EmbeddingCache(Xb, p["C"].shape[0]))[0]
    return {name: d[name] for name in EXERCISE1_NAMES}


def embedding_grad_loop(demb: Tensor, Xb: Tensor, C: Tensor) -> Tensor:
    """The lecture's version: a row of C gets every upstream row that looked it up."""
    dC = torch.zeros_like(C)
    for k in range(Xb.shape[0]):
        for j in range(Xb.shape[1]):
            dC[Xb[k, j]] += demb[k, j]
    return dC


def fused_dlogits(logits: Tensor, Yb: Tensor) -> Tensor:
    """Exercise 2: dlogits = (softmax(logits) - onehot(Yb)) / n."""
    _, cache = L.cross_entropy_forward(logits, Yb)
    return L.cross_entropy_backward(1.0, cache)[0]


def fused_dhprebn(hprebn: Tensor, bngain: Tensor, dhpreact: Tensor) -> Tensor:
    """Exercise 3: dhprebn from dhpreact through batchnorm in one formula."""
    _, cache = L.batchnorm_forward(hprebn, bngain, torch.zeros_like(bngain))
    return L.batchnorm_backward(dhpreact, cache)[0]


def autograd_reference(p: M.Params, Xb: Tensor, Yb: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
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
    tables: dict[str, list[Comparison]]  # exercise1, exercise2, exercise3, model

    @property
    def ok(self) -> bool:
        return all(r.approx for rows in self.tables.values() for r in rows)


def run_check(setup: CheckSetup) -> CheckReport:
    """Exercises 1-3 and the full model's backward against autograd, on one setup."""
    p, Xb, Yb = setup.params, setup.Xb, setup.Yb
    t, ref = autograd_reference(p, Xb, Yb)
    mine = atomic_backward(p, Xb, Yb, t)
    ex1 = [compare(name, mine[name], ref[name]) for name in EXERCISE1_NAMES]
    ex2 = [compare("logits", fused_dlogits(t["logits"], Yb), ref["logits"])]
    ex3 = [compare("hprebn", fused_dhprebn(t["hprebn"], p["bngain"], ref["hpreact"]), ref["hprebn"])]
    loss, grads = M.loss_and_grads(p, Xb, Yb)
    model_ref = model_autograd_grads(p, Xb, Yb)
    model_rows = [compare(name, grads[name], model_ref[name]) for name in M.PARAM_NAMES]
    return CheckReport(float(t["loss"]), {"exercise1": ex1, "exercise2": ex2, "exercise3": ex3,
                                          "model": model_rows})


def model_autograd_grads(p: M.Params, X: Tensor, Y: Tensor) -> M.Params:
    """Autograd's parameter gradients of the model's loss: the reference for its backward."""
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in p.items()}
    with torch.enable_grad():
        M.forward(leaves, X, Y).loss.backward()
    return {k: v.grad for k, v in leaves.items()}
