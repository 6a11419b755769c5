"""Training steps: one SGD step on a batch, by four routes that must agree.

Dimension letters: n batch, T block_size, C n_embd, H n_hidden, V vocab size.

- ``FastStep``: the default. The same hand-written math as ``model.backward``, but the step is
  launch-bound (about 2 MFLOP at the lecture's size: tens of microseconds of arithmetic against
  microseconds of overhead per kernel), so it is written as few kernels as possible, each
  writing into a buffer allocated once: parameters and gradients live in two flat tensors, so the
  whole SGD update is one kernel.
- ``EagerStep``: ``model.forward`` + ``model.backward`` + a per-parameter update; the readable one.
- ``LectureStep``: the lecture's atomic backward with its Python loop for dC (a speed baseline).
- ``AutogradStep``: ``loss.backward()``. A reference for checks and benchmarks only.

Every step takes the batch's row indices ``ix`` into the training examples and the learning rate,
updates the parameters in place, and returns the batch loss (a 0-dim tensor, computed before the
update). None but AutogradStep builds an autograd graph.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import atomic
from . import model as M
from .layers import BN_EPS, check_batch_size


class FastStep:
    """A fused, allocation-light SGD step with hand-written gradients.

    Every buffer, and every view of one (transposes included), is made once here: at the
    lecture's size a kernel launch or a view costs about as much as the arithmetic it does.
    """

    def __init__(self, params: M.Params, X: Tensor, Y: Tensor, batch_size: int):
        check_batch_size(batch_size)
        self.X, self.Y, self.n = X, Y, batch_size
        ref = params["W1"]
        self.flat = torch.cat([p.detach().reshape(-1) for p in params.values()])
        self.flat_grad = torch.zeros_like(self.flat)
        self.params = self._views(self.flat, params)
        self.grads = self._views(self.flat_grad, params)
        n, T = batch_size, X.shape[1]
        V, C = params["C"].shape
        H = params["W1"].shape[1]

        def new(*shape, dtype=ref.dtype):
            return torch.empty(shape, dtype=dtype, device=ref.device)

        self.xb, self.yb = new(n, T, dtype=torch.long), new(n, dtype=torch.long)
        self.xb_flat, self.yb_col = self.xb.view(-1), self.yb.view(n, 1)
        self.emb = new(n * T, C)
        self.embcat = self.emb.view(n, T * C)
        self.embcat_T = self.embcat.T
        self.hprebn, self.xhat, self.h, self.tmp_nh = new(n, H), new(n, H), new(n, H), new(n, H)
        self.h_T = self.h.T
        self.stat, self.var_inv, self.coef = new(1, H), new(1, H), new(1, H)
        self.logits, self.logprobs, self.picked = new(n, V), new(n, V), new(n, 1)
        self.dh, self.dhpreact, self.dhprebn = new(n, H), new(n, H), new(n, H)
        self.demb = new(n * T, C)
        self.dembcat = self.demb.view(n, T * C)
        self.W1_T, self.W2_T = self.params["W1"].T, self.params["W2"].T
        self.eps = torch.tensor(BN_EPS, dtype=ref.dtype, device=ref.device)
        self.inv_n = torch.tensor(1.0 / n, dtype=ref.dtype, device=ref.device)
        self.minus_one = torch.full((n, 1), -1.0, dtype=ref.dtype, device=ref.device)
        self.minus_inv_n = torch.full((n,), -1.0 / n, dtype=ref.dtype, device=ref.device)

    @staticmethod
    def _views(flat: Tensor, like: M.Params) -> M.Params:
        views, start = {}, 0
        for name, p in like.items():
            views[name] = flat[start:start + p.numel()].view(p.shape)
            start += p.numel()
        return views

    def step(self, ix: Tensor, lr: float) -> Tensor:
        loss = self.forward_backward(ix)
        self.flat.add_(self.flat_grad, alpha=-lr)
        return loss

    def forward_backward(self, ix: Tensor) -> Tensor:
        """Fill ``self.grads`` with the batch's gradients; return its loss."""
        p, g, n = self.params, self.grads, self.n
        xhat, tmp = self.xhat, self.tmp_nh
        torch.index_select(self.X, 0, ix, out=self.xb)
        torch.index_select(self.Y, 0, ix, out=self.yb)
        # ---- forward
        torch.index_select(p["C"], 0, self.xb_flat, out=self.emb)      # n*T x C
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
        loss = torch.dot(self.picked.view(-1), self.minus_inv_n)
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
        # emb = C[xb]: each row of C gets the sum of the rows that looked it up
        g["C"].zero_().index_add_(0, self.xb_flat, self.demb)
        return loss


class EagerStep:
    """The readable step: the model's layer-pair forward and backward, then SGD per parameter."""

    def __init__(self, params: M.Params, X: Tensor, Y: Tensor, batch_size: int):
        check_batch_size(batch_size)
        self.params = {k: v.detach().clone() for k, v in params.items()}
        self.grads = {k: torch.zeros_like(v) for k, v in self.params.items()}
        self.X, self.Y = X, Y

    def step(self, ix: Tensor, lr: float) -> Tensor:
        loss, grads = M.loss_and_grads(self.params, self.X[ix], self.Y[ix])
        self.grads = grads
        for name, p in self.params.items():
            p.add_(grads[name], alpha=-lr)
        return loss


class LectureStep(EagerStep):
    """The lecture's exercise-4 step: atomic forward, atomic backward with the Python dC loop."""

    def step(self, ix: Tensor, lr: float) -> Tensor:
        xb, yb = self.X[ix], self.Y[ix]
        t = atomic.atomic_forward(self.params, xb, yb)
        d = atomic.atomic_backward(self.params, xb, yb, t, embedding="loop")
        self.grads = {name: d[name] for name in M.PARAM_NAMES}
        for name, p in self.params.items():
            p.add_(d[name], alpha=-lr)
        return t["loss"]


class AutogradStep(EagerStep):
    """Reference only: the same forward, gradients from ``loss.backward()``."""

    def __init__(self, params: M.Params, X: Tensor, Y: Tensor, batch_size: int):
        super().__init__(params, X, Y, batch_size)
        for p in self.params.values():
            p.requires_grad_(True)

    def step(self, ix: Tensor, lr: float) -> Tensor:
        with torch.enable_grad():
            loss = M.forward(self.params, self.X[ix], self.Y[ix]).loss
            for p in self.params.values():
                p.grad = None
            loss.backward()
        self.grads = {k: p.grad for k, p in self.params.items()}
        with torch.no_grad():
            for p in self.params.values():
                p.add_(p.grad, alpha=-lr)
        return loss.detach()


STEPS = {"fast": FastStep, "eager": EagerStep, "lecture": LectureStep, "autograd": AutogradStep}
