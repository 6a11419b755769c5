"""The WaveNet's fused training step: the math of ``models.wavenet.backward``, fused.

Two facts make it short. FlattenConsecutive(2) of a contiguous n x T x C tensor is a view
(n x T/2 x 2C: the same memory), so the tree costs no copy at all. And a batchnorm over dims
(0, 1) of n x T x C is a batchnorm over the rows of its n*T x C view, so every level is the MLP's
fused linear -> batchnorm -> tanh on a 2-D matrix of m = n*T_k rows. Every buffer and view is made
once; parameters and gradients live in two flat buffers (the SGD update is one kernel). Its tests
prove it equal to the model's own forward and backward. As the MLP's, it can be captured in a CUDA
graph (``cuda_graph``), and its embedding gradient is deterministic on CUDA (``EmbeddingGrad``).

Dimension letters: n batch, T block_size, E n_embd, H n_hidden, V vocab size; level k has
m_k = n * T / 2^k rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..models.base import ModelSpec, Params
from ..models.wavenet import MERGE, level_names
from .fused import FusedStep
from .optim import OptimConfig


@dataclass
class Level:
    """One level's buffers and views, all m x H unless said otherwise."""

    x: Tensor        # m x d_in, the flattened input (a view of the level below's output)
    x_T: Tensor
    W: Tensor        # d_in x H
    W_T: Tensor
    gain: Tensor     # 1 x H views of the 1 x 1 x H parameters and their gradients
    bias: Tensor
    dW: Tensor
    dgain: Tensor
    dbias: Tensor
    dx: Tensor       # m x d_in, where the input's gradient goes (a view of the level below's dh)
    pre: Tensor
    xhat: Tensor
    h: Tensor
    dh: Tensor
    dy: Tensor
    dpre: Tensor
    tmp: Tensor
    stat: Tensor     # 1 x H
    var_inv: Tensor  # 1 x H
    coef: Tensor     # 1 x H
    m: int           # the rows batchnorm's statistics cover (over a group: the global batch's)
    sums: Tensor     # 2 x H: over a group, sum(dy) and sum(dy * xhat), all-reduced


class FastStep(FusedStep):
    """The WaveNet's step: every level fused on its 2-D row view, then the head."""

    def __init__(self, spec: ModelSpec, params: Params, X: Tensor, Y: Tensor, batch_size: int,
                 opt: OptimConfig = OptimConfig(), dropout=None, deterministic: bool | None = None):
        super().__init__(params, X, Y, batch_size, opt, deterministic)
        p, g, new = self.params, self.grads, self.new
        n, T = batch_size, X.shape[1]
        E, H = p["C"].shape[1], p["Wout"].shape[0]
        below, dbelow, width, m = self.emb, self.demb, E, n * T
        self.levels: list[Level] = []
        for k in range(1, T.bit_length()):
            W, gain, bias = level_names(k)
            m //= MERGE
            x, dx = below.view(m, MERGE * width), dbelow.view(m, MERGE * width)
            h, dh = new(m, H), new(m, H)
            self.levels.append(Level(
                x, x.T, p[W], p[W].T, p[gain].view(1, H), p[bias].view(1, H), g[W],
                g[gain].view(1, H), g[bias].view(1, H), dx, new(m, H), new(m, H), h, dh,
                new(m, H), new(m, H), new(m, H), new(1, H), new(1, H), new(1, H), m, new(2, H)))
            below, dbelow, width = h, dh, H
        self.top, self.dtop = below, dbelow                        # n x H
        self.top_T, self.Wout_T = self.top.T, p["Wout"].T

    def over_group(self, group) -> None:
        super().over_group(group)
        self.slots = []  # each level's table of every process's shifted sums
        for level in self.levels:
            level.m *= group.world
            self.slots.append(self.new(group.world, 3, level.pre.shape[1]))

    def forward_backward(self, ix: Tensor, loss_out: Tensor | None = None) -> Tensor:
        """Fill ``self.grads`` with the batch's gradients; return its loss (written into
        ``loss_out`` if given)."""
        p, g = self.params, self.grads
        self.embed(ix)                                              # n*T x E
        for i, level in enumerate(self.levels):
            self.level_forward(level, None if self.group is None else self.slots[i])
        torch.addmm(p["bout"], self.top, p["Wout"], out=self.logits)   # n x V
        loss, dlogits = self.cross_entropy(loss_out)
        # logits = top @ Wout + bout
        torch.mm(self.top_T, dlogits, out=g["Wout"])
        torch.sum(dlogits, 0, out=g["bout"])
        torch.mm(dlogits, self.Wout_T, out=self.dtop)
        for level in reversed(self.levels):
            self.level_backward(level)
        self.embedding_grad()  # emb = C[xb]: each row of C gets the rows that looked it up
        return loss

    def level_forward(self, L: Level, slots: Tensor | None) -> None:
        """pre = x @ W; batchnorm over the m rows (statistics from sums; over a group, from
        ``slots`` and one all-reduce); h = tanh."""
        torch.mm(L.x, L.W, out=L.pre)
        if slots is None:
            torch.sum(L.pre, 0, keepdim=True, out=L.stat)
            torch.add(L.pre, L.stat, alpha=-1.0 / L.m, out=L.xhat)
            torch.sum(torch.mul(L.xhat, L.xhat, out=L.tmp), 0, keepdim=True, out=L.stat)
            torch.add(self.eps, L.stat, alpha=1.0 / (L.m - 1), out=L.var_inv).rsqrt_()
            L.xhat.mul_(L.var_inv)
        else:
            self.normalise_over_group(L.pre, L.xhat, L.tmp, slots, L.var_inv)
        torch.addcmul(L.bias, L.gain, L.xhat, out=L.h).tanh_()

    def level_backward(self, L: Level) -> None:
        # h = tanh(y): dy = dh * (1 - h^2)
        torch.addcmul(L.dh, L.dh, torch.mul(L.h, L.h, out=L.tmp), value=-1.0, out=L.dy)
        # batchnorm: dpre = gain*var_inv * (dy - sum(dy)/m - xhat * sum(dy*xhat)/(m-1))
        torch.sum(L.dy, 0, keepdim=True, out=L.dbias)
        torch.sum(torch.mul(L.dy, L.xhat, out=L.tmp), 0, keepdim=True, out=L.dgain)
        dbias, dgain = L.dbias, L.dgain
        if self.group is not None:  # the group's sums for dpre; the gradients keep this slice's
            L.sums[0:1].copy_(dbias)
            L.sums[1:2].copy_(dgain)
            self.group.reduce(L.sums)
            dbias, dgain = L.sums[0:1], L.sums[1:2]
        torch.add(L.dy, dbias, alpha=-1.0 / L.m, out=L.dpre)
        torch.addcmul(L.dpre, L.xhat, dgain, value=-1.0 / (L.m - 1), out=L.tmp)
        torch.mul(L.tmp, torch.mul(L.gain, L.var_inv, out=L.coef), out=L.dpre)
        # pre = x @ W
        torch.mm(L.x_T, L.dpre, out=L.dW)
        torch.mm(L.dpre, L.W_T, out=L.dx)
