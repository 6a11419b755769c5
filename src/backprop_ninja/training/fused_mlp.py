"""The MLP's fused training step: the same hand-written math as ``models.mlp.backward``, fused.

The step is launch-bound (about 2 MFLOP at the lecture's size: tens of microseconds of
arithmetic against microseconds of overhead per kernel), so it is written as few kernels as
possible, each writing into a buffer allocated once: parameters and gradients live in two flat
tensors, so the whole SGD update is one kernel. Its tests prove it equal to the model's own
forward and backward. Nothing in ``forward_backward`` allocates, syncs with the host or takes a
number that changes from step to step, so on CUDA it can be captured in a graph (``cuda_graph``).

Dimension letters: n batch, T block_size, E n_embd, H n_hidden, V vocab size.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..models.base import ModelSpec, Params
from ..nn.normalisation import BN_EPS, check_batch_size
from .optim import FlatParams, OptimConfig, make_optimizer


class FastStep:
    """A fused, allocation-light SGD step with hand-written gradients.

    Every buffer, and every view of one (transposes included), is made once here: at the
    lecture's size a kernel launch or a view costs about as much as the arithmetic it does.
    """

    def __init__(self, spec: ModelSpec, params: Params, X: Tensor, Y: Tensor, batch_size: int,
                 opt: OptimConfig = OptimConfig(), dropout=None, deterministic: bool | None = None):
        check_batch_size(batch_size)
        self.X, self.Y, self.n = X, Y, batch_size
        ref = params["W1"]
        self.buffers = FlatParams(params)
        self.flat, self.params, self.grads = self.buffers.flat, self.buffers.params, self.buffers.grads
        self.optimizer = make_optimizer(self.buffers, opt)
        n, T = batch_size, X.shape[1]
        V, E = params["C"].shape
        H = params["W1"].shape[1]

        def new(*shape, dtype=ref.dtype):
            return torch.empty(shape, dtype=dtype, device=ref.device)

        self.xb, self.yb = new(n, T, dtype=torch.long), new(n, dtype=torch.long)
        self.xb_flat, self.yb_col = self.xb.view(-1), self.yb.view(n, 1)
        self.emb = new(n * T, E)
        self.embcat = self.emb.view(n, T * E)
        self.embcat_T = self.embcat.T
        self.hprebn, self.xhat, self.h, self.tmp_nh = new(n, H), new(n, H), new(n, H), new(n, H)
        self.h_T = self.h.T
        self.stat, self.var_inv, self.coef = new(1, H), new(1, H), new(1, H)
        self.logits, self.logprobs, self.picked = new(n, V), new(n, V), new(n, 1)
        self.dh, self.dhpreact, self.dhprebn = new(n, H), new(n, H), new(n, H)
        self.demb = new(n * T, E)
        self.dembcat = self.demb.view(n, T * E)
        self.embedding_grad = EmbeddingGrad(self.xb_flat, self.demb, self.grads["C"], deterministic)
        self.W1_T, self.W2_T = self.params["W1"].T, self.params["W2"].T
        self.eps = torch.tensor(BN_EPS, dtype=ref.dtype, device=ref.device)
        self.inv_n = torch.tensor(1.0 / n, dtype=ref.dtype, device=ref.device)
        self.minus_one = torch.full((n, 1), -1.0, dtype=ref.dtype, device=ref.device)
        self.minus_inv_n = torch.full((n,), -1.0 / n, dtype=ref.dtype, device=ref.device)

    def step(self, ix: Tensor, lr: float) -> Tensor:
        loss = self.forward_backward(ix)
        self.optimizer.step(lr)
        return loss

    def forward_backward(self, ix: Tensor, loss_out: Tensor | None = None) -> Tensor:
        """Fill ``self.grads`` with the batch's gradients; return its loss (written into
        ``loss_out`` if given: a graph's step writes it into its own slot)."""
        p, g, n = self.params, self.grads, self.n
        xhat, tmp = self.xhat, self.tmp_nh
        torch.index_select(self.X, 0, ix, out=self.xb)
        torch.index_select(self.Y, 0, ix, out=self.yb)
        # ---- forward
        torch.index_select(p["C"], 0, self.xb_flat, out=self.emb)      # n*T x E
        torch.addmm(p["b1"], self.embcat, p["W1"], out=self.hprebn)     # n x H
        # batchnorm statistics from sums (var_mean's reduction is slow for tall, thin inputs)
        torch.sum(self.hprebn, 0, keepdim=True, out=self.stat)
        torch.add(self.hprebn, self.stat, alpha=-1.0 / n, out=xhat)      # bndiff
        torch.sum(torch.mul(xhat, xhat, out=tmp), 0, keepdim=True, out=self.stat)
        torch.add(self.eps, self.stat, alpha=1.0 / (n - 1), out=self.var_inv).rsqrt_()
        xhat.mul_(self.var_inv)
        torch.addcmul(p["bnbias"], p["bngain"], xhat, out=self.h).tanh_()
        torch.addmm(p["b2"], self.h, p["W2"], out=self.logits)          # n x V
        # ---- softmax cross-entropy; dlogits = (probs - onehot) / n, built in place over probs
        # (log-softmax first: the loss stays finite where a probability underflows to 0)
        logprobs = torch.log_softmax(self.logits, dim=1, out=self.logprobs)
        torch.gather(logprobs, 1, self.yb_col, out=self.picked)
        loss = torch.dot(self.picked.view(-1), self.minus_inv_n, out=loss_out)
        dlogits = logprobs.exp_().scatter_add_(1, self.yb_col, self.minus_one).mul_(self.inv_n)
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
        torch.add(dy, g["bnbias"], alpha=-1.0 / n, out=self.dhprebn)
        torch.addcmul(self.dhprebn, xhat, g["bngain"], value=-1.0 / (n - 1), out=tmp)
        torch.mul(tmp, torch.mul(p["bngain"], self.var_inv, out=self.coef), out=self.dhprebn)
        # hprebn = embcat @ W1 + b1
        torch.mm(self.embcat_T, self.dhprebn, out=g["W1"])
        torch.sum(self.dhprebn, 0, out=g["b1"])
        torch.mm(self.dhprebn, self.W1_T, out=self.dembcat)
        self.embedding_grad()  # emb = C[xb]: each row of C gets the rows that looked it up
        return loss


class EmbeddingGrad:
    """dC for emb = C[xb]: each row of C gets the sum of the rows of demb that looked it up.

    On the CPU an ``index_add_`` (the CPU's figures are pinned to it). On CUDA ``index_add_``
    adds with atomics, in an order that varies from run to run, so there it is a one-hot
    matmul, ``onehot(xb)^T @ demb``: one fixed order of summation, the same bits every run, for
    an (n*T) x V buffer and one small GEMM in place of the scatter (two kernels either way).
    """

    def __init__(self, xb_flat: Tensor, demb: Tensor, dC: Tensor, deterministic: bool | None = None):
        self.xb_flat, self.demb, self.dC = xb_flat, demb, dC
        if deterministic is None:
            deterministic = dC.device.type == "cuda"
        self.onehot = None
        if deterministic:
            V = dC.shape[0]
            self.xb_col = xb_flat.view(-1, 1)
            # in demb's dtype, so that the comparison's common dtype is the output's: one kernel
            self.vocab = torch.arange(V, dtype=demb.dtype, device=dC.device).view(1, V)
            self.onehot = torch.empty(xb_flat.shape[0], V, dtype=demb.dtype, device=dC.device)
            self.onehot_T = self.onehot.T

    def __call__(self) -> None:
        if self.onehot is None:
            self.dC.zero_().index_add_(0, self.xb_flat, self.demb)
        else:
            torch.eq(self.xb_col, self.vocab, out=self.onehot)
            torch.mm(self.onehot_T, self.demb, out=self.dC)
