"""What the fused steps share: the batch and logits buffers, the fused softmax cross-entropy,
the embedding's gradient, and the update over flat buffers.

A fused step is launch-bound (a few MFLOP a step at the lectures' sizes: tens of microseconds of
arithmetic against microseconds of overhead per kernel), so it is written as few kernels as
possible, each writing into a buffer allocated once: parameters and gradients live in two flat
tensors (``optim.FlatParams``), so an update is a handful of kernels whatever the number of
parameters. Nothing in a ``forward_backward`` allocates, syncs with the host or takes a number
that changes from step to step, so on CUDA it can be captured in a graph (``cuda_graph``).

Dimension letters: n batch, T block_size, E n_embd, V vocab size.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..models.base import Params
from ..nn.group import GroupSum
from ..nn.normalisation import BN_EPS, check_batch_size, group_moments
from .optim import FlatParams, OptimConfig, descend, make_optimizer, sharpness_aware


class FusedStep:
    """The shared half of a fused step; a subclass builds its layers' buffers and writes
    ``forward_backward(ix, loss_out=None)``.

    Every buffer, and every view of one (transposes included), is made once: at the lecture's
    size a kernel launch or a view costs about as much as the arithmetic it does.
    """

    def __init__(self, params: Params, X: Tensor, Y: Tensor, batch_size: int, opt: OptimConfig,
                 deterministic: bool | None):
        check_batch_size(batch_size)
        self.X, self.Y, self.n = X, Y, batch_size
        self.buffers = FlatParams(params, opt.shards)
        self.flat, self.params, self.grads = self.buffers.flat, self.buffers.params, self.buffers.grads
        self.optimizer = make_optimizer(self.buffers, opt)
        self.sam = sharpness_aware(self.buffers, opt)
        n, T = batch_size, X.shape[1]
        V, E = params["C"].shape
        self.dtype, self.device = params["C"].dtype, params["C"].device
        self.xb, self.yb = self.new(n, T, dtype=torch.long), self.new(n, dtype=torch.long)
        self.xb_flat, self.yb_col = self.xb.view(-1), self.yb.view(n, 1)
        # data stored in a smaller integer type is gathered in it, then widened per batch
        self.xs = None if X.dtype == torch.long else self.new(n, T, dtype=X.dtype)
        self.ys = None if Y.dtype == torch.long else self.new(n, dtype=Y.dtype)
        self.emb, self.demb = self.new(n * T, E), self.new(n * T, E)
        self.embedding_grad = EmbeddingGrad(self.xb_flat, self.demb, self.grads["C"], deterministic)
        self.logits, self.logprobs, self.picked = self.new(n, V), self.new(n, V), self.new(n, 1)
        self.eps = torch.tensor(BN_EPS, dtype=self.dtype, device=self.device)
        self.inv_n = torch.tensor(1.0 / n, dtype=self.dtype, device=self.device)
        self.minus_one = torch.full((n, 1), -1.0, dtype=self.dtype, device=self.device)
        self.minus_inv_n = torch.full((n,), -1.0 / n, dtype=self.dtype, device=self.device)
        # across processes (``over_group``): the group batchnorm's statistics span; its
        # ``reduce`` sums batchnorm's sums over the processes
        self.group: GroupSum | None = None

    def over_group(self, group: GroupSum) -> None:
        """Batchnorm over the group's global batch of ``group.world`` slices like this one. A
        step without batchnorm needs nothing."""
        self.group = group

    def normalise_over_group(self, pre: Tensor, xhat: Tensor, tmp: Tensor, slots: Tensor,
                             var_inv: Tensor) -> None:
        """xhat = (pre - mean) * var_inv, with the mean and the Bessel variance of the group's
        global batch, from one all-reduce (``nn.normalisation``'s group forward, fused): this
        process's centre (its own mean), residual sum and M2 about the centre in its slot of
        ``slots`` (world x 3 x H), the rest zeroed, summed over the group and combined by
        ``group_moments``."""
        k, group = pre.shape[0], self.group
        slots.zero_()
        mine = slots[group.rank]
        centre = torch.sum(pre, 0, keepdim=True, out=mine[0:1]).div_(k)
        torch.sub(pre, centre, out=xhat)
        torch.sum(xhat, 0, keepdim=True, out=mine[1:2])
        torch.sum(torch.mul(xhat, xhat, out=tmp), 0, keepdim=True, out=mine[2:3])
        centre = centre.clone()  # the SUM adds the others' zeros to it: keep it as it was
        group.reduce(slots)
        counts = torch.full((group.world, 1), k, dtype=pre.dtype, device=pre.device)
        mean, m2, _ = group_moments(slots[:, 0], slots[:, 1], slots[:, 2], counts)
        torch.add(self.eps, m2.view(1, -1), alpha=1.0 / (k * group.world - 1), out=var_inv).rsqrt_()
        # pre - mean = (pre - centre) + (centre - mean), scaled: one pass over the rows
        torch.addcmul((centre - mean) * var_inv, xhat, var_inv, out=xhat)

    def new(self, *shape: int, dtype: torch.dtype | None = None) -> Tensor:
        return torch.empty(shape, dtype=dtype or self.dtype, device=self.device)

    def step(self, ix: Tensor, lr: float) -> Tensor:
        return descend(self.forward_backward, ix, lr, self.optimizer, self.sam)

    def embed(self, ix: Tensor) -> None:
        """The batch's rows of X and Y, and its embeddings: emb = C[xb], n*T x E."""
        for data, small, wide in ((self.X, self.xs, self.xb), (self.Y, self.ys, self.yb)):
            if small is None:
                torch.index_select(data, 0, ix, out=wide)
            else:
                wide.copy_(torch.index_select(data, 0, ix, out=small))
        torch.index_select(self.params["C"], 0, self.xb_flat, out=self.emb)

    def cross_entropy(self, loss_out: Tensor | None) -> tuple[Tensor, Tensor]:
        """The loss of ``self.logits`` (into ``loss_out`` if given) and dlogits =
        (probs - onehot) / n, built in place over the probabilities. log-softmax first: the
        loss stays finite where a probability underflows to 0."""
        logprobs = torch.log_softmax(self.logits, dim=1, out=self.logprobs)
        torch.gather(logprobs, 1, self.yb_col, out=self.picked)
        loss = torch.dot(self.picked.view(-1), self.minus_inv_n, out=loss_out)
        dlogits = logprobs.exp_().scatter_add_(1, self.yb_col, self.minus_one).mul_(self.inv_n)
        return loss, dlogits


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
