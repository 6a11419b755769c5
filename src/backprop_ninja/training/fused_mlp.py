"""The MLP's fused training step: the same hand-written math as ``models.mlp.backward``, fused
(see ``fused`` for what every fused step shares). Its tests prove it equal to the model's own
forward and backward.

Dimension letters: n batch, T block_size, E n_embd, H n_hidden, V vocab size.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..models.base import ModelSpec, Params
from .fused import FusedStep
from .optim import OptimConfig


class FastStep(FusedStep):
    """The MLP's step: one linear -> batchnorm -> tanh layer and the head, fused."""

    def __init__(self, spec: ModelSpec, params: Params, X: Tensor, Y: Tensor, batch_size: int,
                 opt: OptimConfig = OptimConfig(), dropout=None, deterministic: bool | None = None):
        super().__init__(params, X, Y, batch_size, opt, deterministic)
        n, T, new = batch_size, X.shape[1], self.new
        E, H = params["C"].shape[1], params["W1"].shape[1]
        self.embcat = self.emb.view(n, T * E)
        self.embcat_T = self.embcat.T
        self.hprebn, self.xhat, self.h, self.tmp_nh = new(n, H), new(n, H), new(n, H), new(n, H)
        self.h_T = self.h.T
        self.stat, self.var_inv, self.coef = new(1, H), new(1, H), new(1, H)
        self.dh, self.dhpreact, self.dhprebn = new(n, H), new(n, H), new(n, H)
        self.dembcat = self.demb.view(n, T * E)
        self.W1_T, self.W2_T = self.params["W1"].T, self.params["W2"].T
        self.bn_m = n  # the rows batchnorm's statistics cover (the global batch, over a group)
        self.bn_sums = new(2, H)  # over a group: sum(dy) and sum(dy * xhat), all-reduced
        self.bn_slots = None      # over a group: every process's shifted sums (``normalise_over_group``)

    def over_group(self, group) -> None:
        super().over_group(group)
        self.bn_m = self.n * group.world
        self.bn_slots = self.new(group.world, 3, self.hprebn.shape[1])

    def forward_backward(self, ix: Tensor, loss_out: Tensor | None = None) -> Tensor:
        """Fill ``self.grads`` with the batch's gradients; return its loss (written into
        ``loss_out`` if given: a graph's step writes it into its own slot)."""
        p, g, n = self.params, self.grads, self.n
        xhat, tmp = self.xhat, self.tmp_nh
        self.embed(ix)                                                   # n*T x E
        torch.addmm(p["b1"], self.embcat, p["W1"], out=self.hprebn)     # n x H
        if self.group is None:
            # batchnorm statistics from sums (var_mean's reduction is slow for tall, thin inputs)
            torch.sum(self.hprebn, 0, keepdim=True, out=self.stat)
            torch.add(self.hprebn, self.stat, alpha=-1.0 / n, out=xhat)  # bndiff
            torch.sum(torch.mul(xhat, xhat, out=tmp), 0, keepdim=True, out=self.stat)
            torch.add(self.eps, self.stat, alpha=1.0 / (n - 1), out=self.var_inv).rsqrt_()
            xhat.mul_(self.var_inv)
        else:  # over a group: the global batch's mean and variance, one all-reduce
            n = self.bn_m
            self.normalise_over_group(self.hprebn, xhat, tmp, self.bn_slots, self.var_inv)
        torch.addcmul(p["bnbias"], p["bngain"], xhat, out=self.h).tanh_()
        torch.addmm(p["b2"], self.h, p["W2"], out=self.logits)          # n x V
        loss, dlogits = self.cross_entropy(loss_out)
        # ---- backward: logits = h @ W2 + b2
        torch.mm(self.h_T, dlogits, out=g["W2"])
        torch.sum(dlogits, 0, out=g["b2"])
        torch.mm(dlogits, self.W2_T, out=self.dh)
        # h = tanh(hpreact): dhpreact = dh * (1 - h^2)
        torch.addcmul(self.dh, self.dh, torch.mul(self.h, self.h, out=tmp), value=-1.0,
                      out=self.dhpreact)
        # batchnorm: dx = gain*var_inv * (dy - sum(dy)/n - xhat * sum(dy*xhat)/(n-1))
        dy = self.dhpreact
        torch.sum(dy, 0, keepdim=True, out=g["bnbias"])
        torch.sum(torch.mul(dy, xhat, out=tmp), 0, keepdim=True, out=g["bngain"])
        dbias, dgain = g["bnbias"], g["bngain"]
        if self.group is not None:  # the group's sums for dx; the gradients keep this slice's
            self.bn_sums[0:1].copy_(dbias)
            self.bn_sums[1:2].copy_(dgain)
            self.group.reduce(self.bn_sums)
            dbias, dgain = self.bn_sums[0:1], self.bn_sums[1:2]
        torch.add(dy, dbias, alpha=-1.0 / n, out=self.dhprebn)
        torch.addcmul(self.dhprebn, xhat, dgain, value=-1.0 / (n - 1), out=tmp)
        torch.mul(tmp, torch.mul(p["bngain"], self.var_inv, out=self.coef), out=self.dhprebn)
        # hprebn = embcat @ W1 + b1
        torch.mm(self.embcat_T, self.dhprebn, out=g["W1"])
        torch.sum(self.dhprebn, 0, out=g["b1"])
        torch.mm(self.dhprebn, self.W1_T, out=self.dembcat)
        self.embedding_grad()  # emb = C[xb]: each row of C gets the rows that looked it up
        return loss
