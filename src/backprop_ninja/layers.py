"""Layers as forward/backward pairs, each backward written by hand at the tensor level.

Dimension letters: n batch, T block_size, C n_embd, H n_hidden, V vocab size, D_in / D_out the
sides of a linear layer.

Contract (CS231n style): ``<layer>_forward(inputs...) -> (out, cache)`` with a typed cache, and
``<layer>_backward(dout, cache) -> gradients of the differentiable inputs, in input order``.
Integer inputs (token indices, targets) have no gradient and are not returned.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .errors import UserError

BN_EPS = 1e-5


# ---------------------------------------------------------------------------------------------
# embedding: emb[k, t] = C[ix[k, t]]

class EmbeddingCache(NamedTuple):
    ix: Tensor          # n x T int64, the looked-up rows
    num_rows: int       # V, rows of the table


def embedding_forward(C: Tensor, ix: Tensor) -> tuple[Tensor, EmbeddingCache]:
    return C[ix], EmbeddingCache(ix, C.shape[0])  # n x T x C


def embedding_backward(demb: Tensor, cache: EmbeddingCache) -> tuple[Tensor]:
    """A row used k times receives the sum of its k upstream gradients: a scatter-add."""
    n_embd = demb.shape[-1]
    dC = demb.new_zeros(cache.num_rows, n_embd)
    dC.index_add_(0, cache.ix.reshape(-1), demb.reshape(-1, n_embd))
    return (dC,)


# ---------------------------------------------------------------------------------------------
# linear: out = x @ w + b

class LinearCache(NamedTuple):
    x: Tensor  # n x D_in
    w: Tensor  # D_in x D_out


def linear_forward(x: Tensor, w: Tensor, b: Tensor) -> tuple[Tensor, LinearCache]:
    return torch.addmm(b, x, w), LinearCache(x, w)  # n x D_out


def linear_backward(dout: Tensor, cache: LinearCache) -> tuple[Tensor, Tensor, Tensor]:
    """Matmul backward is a matmul with a transpose; b is broadcast over rows, so db sums them."""
    dx = dout @ cache.w.T      # n x D_in
    dw = cache.x.T @ dout      # D_in x D_out
    db = dout.sum(0)           # D_out
    return dx, dw, db


# ---------------------------------------------------------------------------------------------
# tanh

class TanhCache(NamedTuple):
    out: Tensor


def tanh_forward(x: Tensor) -> tuple[Tensor, TanhCache]:
    out = torch.tanh(x)
    return out, TanhCache(out)


def tanh_backward(dout: Tensor, cache: TanhCache) -> tuple[Tensor]:
    return (dout * (1.0 - cache.out * cache.out),)


# ---------------------------------------------------------------------------------------------
# batch normalisation, training mode, with Bessel's correction (divide by n-1) as in the lecture

class BatchNormStats(NamedTuple):
    """Per-feature statistics used to normalise at evaluation and sampling: each 1 x H."""

    mean: Tensor
    var: Tensor


class BatchNormCache(NamedTuple):
    xhat: Tensor     # n x H, the normalised input
    gain: Tensor     # 1 x H
    var_inv: Tensor  # 1 x H, 1/sqrt(var + eps)
    stats: BatchNormStats  # the batch's own mean and unbiased variance


def check_batch_size(n: int) -> None:
    if n < 2:
        raise UserError(f"batch normalisation needs a batch of at least 2 (got {n}): its variance "
                        "divides by n-1 (Bessel's correction); use --batch-size 2 or more")


def batchnorm_forward(x: Tensor, gain: Tensor, bias: Tensor,
                      eps: float = BN_EPS) -> tuple[Tensor, BatchNormCache]:
    n = x.shape[0]
    check_batch_size(n)
    var, mean = torch.var_mean(x, dim=0, keepdim=True, correction=1)
    var_inv = (var + eps).rsqrt()
    xhat = (x - mean) * var_inv
    out = gain * xhat + bias  # n x H
    return out, BatchNormCache(xhat, gain, var_inv, BatchNormStats(mean, var))


def batchnorm_backward(dout: Tensor, cache: BatchNormCache) -> tuple[Tensor, Tensor, Tensor]:
    """Exercise 3, fused:  dx = gain*var_inv/n * (n*dy - sum(dy) - n/(n-1) * xhat * sum(dy*xhat)).

    gain and bias are broadcast over the batch, so their gradients sum over it (keeping the 1 x H
    shape of the parameters).
    """
    n = dout.shape[0]
    dbias = dout.sum(0, keepdim=True)
    dgain = (dout * cache.xhat).sum(0, keepdim=True)
    dx = cache.gain * cache.var_inv / n * (n * dout - dbias - n / (n - 1) * cache.xhat * dgain)
    return dx, dgain, dbias


def batchnorm_apply(x: Tensor, gain: Tensor, bias: Tensor, stats: BatchNormStats,
                    eps: float = BN_EPS) -> Tensor:
    """Evaluation mode: normalise with given statistics (no backward: nothing trains here).

    gain * (x - mean) / sqrt(var + eps) + bias, folded into one multiply-add per element:
    x * scale + shift, with scale and shift computed once per feature.
    """
    scale = gain * (stats.var + eps).rsqrt()
    return torch.addcmul(bias - stats.mean * scale, x, scale)


# ---------------------------------------------------------------------------------------------
# softmax cross-entropy, mean over the batch

class CrossEntropyCache(NamedTuple):
    probs: Tensor    # n x V
    targets: Tensor  # n int64


def cross_entropy_forward(logits: Tensor, targets: Tensor) -> tuple[Tensor, CrossEntropyCache]:
    logprobs = torch.log_softmax(logits, dim=1)
    loss = -logprobs.gather(1, targets.view(-1, 1)).mean()
    return loss, CrossEntropyCache(logprobs.exp(), targets)


def cross_entropy_backward(dloss: Tensor | float, cache: CrossEntropyCache) -> tuple[Tensor]:
    """Exercise 2, fused: dlogits = (softmax(logits) - onehot(y)) / n, times the upstream dloss.

    Each row sums to zero: the wrong classes are pushed down by their probability and the right
    one pulled up by 1 - p, so the pull balances the push.
    """
    n = cache.probs.shape[0]
    dlogits = cache.probs.clone()
    dlogits[torch.arange(n, device=dlogits.device), cache.targets] -= 1.0
    return (dlogits * (dloss / n),)
