"""Batch normalisation over every dimension but the last (the features), as in the lectures, and
layer normalisation over the last dimension alone (GPT-2's, for the transformer).

For a 2-D input (n x H) the statistics are over dim 0; for a 3-D input (n x T x C, the WaveNet)
over dims (0, 1), shaped 1 x 1 x C: makemore part 5's fix, since statistics over dim 0 alone
would keep T separate means per feature. The batch variance uses Bessel's correction (divide by
m-1, m the number of values per feature: n, or n*T) in training and at inference alike, as the
lecture does; ``correction=0`` gives the biased variance of the batchnorm paper.

Layer normalisation needs no batch statistics: each row (each position of each sequence) is
normalised by its own mean and biased variance over its C features, the same in training and
evaluation, so it has no evaluation mode and no batch-size limit.

Batchnorm across processes (data-parallel training): inside ``group.over_group`` a training
batchnorm normalises with the statistics of the whole global batch, every process holding a slice
of it; ``group.reduce`` sums a tensor in place over the processes (an all-reduce). The forward
takes one collective: each process puts its count, its own mean c_r, the residual sum(x - c_r)
and its sum of squares about c_r (M2) into its own slot of a zeroed table, one SUM fills every
slot (adding zeros is exact, so this is an all-gather), and ``group_moments`` combines the slots
by Chan, Golub and LeVeque's pairwise formula: the Bessel variance never subtracts two large sums
(as sum(x^2) - m mean^2 would), and every process computes the same bits from the same table. The backward all-reduces sum(dy) and
sum(dy * xhat) and applies exercise 3's formula with the global m. The gradients of gain and bias
stay the process's own sums (the flat gradient all-reduce adds them up). Outside ``over_group``
(the default) nothing changes, bit for bit.

Dimension letters: n batch, T positions, H or C features; m = n (2-D) or n*T (3-D).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import Tensor

from ..errors import UserError
from .group import GroupSum
from .group import current as current_group

BN_EPS = 1e-5
LN_EPS = 1e-5  # GPT-2's (torch.nn.LayerNorm's default)


class BatchNormStats(NamedTuple):
    """Per-feature statistics used to normalise at evaluation and sampling: each 1 x H (or
    1 x 1 x C)."""

    mean: Tensor
    var: Tensor


class BatchNormCache(NamedTuple):
    xhat: Tensor     # like x, the normalised input
    gain: Tensor     # 1 x H
    var_inv: Tensor  # 1 x H, 1/sqrt(var + eps)
    stats: BatchNormStats  # the batch's own mean and variance
    correction: int  # 1: Bessel's (the lecture's), 0: biased
    # across processes: the all-reduce (sums a tensor in place over the group) and the global m
    reduce: Callable[[Tensor], None] | None = None
    m: int | None = None


def group_moments(centres: Tensor, residuals: Tensor, m2s: Tensor, counts: Tensor
                  ) -> tuple[Tensor, Tensor, Tensor]:
    """The global batch's mean and M2 (its sum of squared deviations from that mean) from every
    process's shifted sums. Each row r (world x H, counts world x 1) holds a process's centre c_r
    (its own mean, as computed), the residual S_r = sum(x - c_r) that the centre's rounding
    leaves, and M2_r = sum((x - c_r)^2), its k_r rows. Returns (mean, M2, m), m the rows in all.
    Chan, Golub and LeVeque's pairwise combination, exact in exact arithmetic for any centres:
    with d_r = c_r - mean,

        M2 = sum_r M2_r + 2 d_r S_r + k_r d_r^2

    Every term is small where the data's spread is: nothing subtracts two large sums (as
    sum(x^2) - m mean^2 would), and an error in the mean changes M2 only by its square.
    """
    m = counts.sum()
    mean = (counts * centres + residuals).sum(0) / m
    d = centres - mean
    return mean, m2s.sum(0) + (d * (2 * residuals + counts * d)).sum(0), m


def feature_dims(x: Tensor) -> tuple[int, ...]:
    """The dimensions the statistics reduce over: all but the last."""
    return tuple(range(x.ndim - 1))


def check_batch_size(m: int) -> None:
    if m < 2:
        raise UserError(f"batch normalisation needs a batch of at least 2 (got {m}): its variance "
                        "divides by n-1 (Bessel's correction); use --batch-size 2 or more")


def batchnorm_forward(x: Tensor, gain: Tensor, bias: Tensor, stats: BatchNormStats | None = None,
                      correction: int = 1, eps: float = BN_EPS) -> tuple[Tensor, BatchNormCache | None]:
    """Training mode (``stats=None``): normalise with the batch's own statistics, and return a
    cache for the backward pass. Evaluation mode: normalise with the given statistics; nothing
    trains there, so the cache is None."""
    if stats is not None:
        return batchnorm_apply(x, gain, bias, stats, eps), None
    group = current_group()
    if group is not None:
        return batchnorm_forward_over_group(x, gain, bias, correction, eps, group)
    dims = feature_dims(x)
    check_batch_size(x.numel() // x.shape[-1])
    var, mean = torch.var_mean(x, dim=dims, keepdim=True, correction=correction)
    var_inv = (var + eps).rsqrt()
    xhat = (x - mean) * var_inv
    out = gain * xhat + bias
    return out, BatchNormCache(xhat, gain, var_inv, BatchNormStats(mean, var), correction)


def batchnorm_backward(dout: Tensor, cache: BatchNormCache) -> tuple[Tensor, Tensor, Tensor]:
    """Exercise 3, fused, with m values per feature and c the correction (1: Bessel's):

        dx = gain * var_inv / m * (m*dy - sum(dy) - m/(m-c) * xhat * sum(dy * xhat))

    gain and bias are broadcast over the m values, so their gradients are those same two sums
    (keeping the parameters' 1 x H shape). Every term matters: with a constant dy, sum(dy*xhat)
    is 0 and m*dy - sum(dy) is 0, so a check driven by a constant upstream gradient would pass
    a backward that dropped either.
    """
    if cache.reduce is not None:
        return batchnorm_backward_over_group(dout, cache)
    dims = feature_dims(dout)
    m = dout.numel() // dout.shape[-1]
    dbias = dout.sum(dims, keepdim=True)
    dgain = (dout * cache.xhat).sum(dims, keepdim=True)
    dx = cache.gain * cache.var_inv / m * (
        m * dout - dbias - m / (m - cache.correction) * cache.xhat * dgain)
    return dx, dgain, dbias


def batchnorm_forward_over_group(x: Tensor, gain: Tensor, bias: Tensor, correction: int, eps: float,
                                 group: GroupSum) -> tuple[Tensor, BatchNormCache]:
    """Training batchnorm over the group's global batch, its statistics from one collective:
    this process's centre, residual sum, M2 about the centre and rows (``group_moments``) in its
    slot of a zeroed world-row table, summed over the group."""
    dims = feature_dims(x)
    H, k = x.shape[-1], x.numel() // x.shape[-1]
    centre = x.sum(dims, keepdim=True) / k
    xc = x - centre
    slots = x.new_zeros(group.world, 3 * H + 1)
    slots[group.rank] = torch.cat([centre.reshape(-1), xc.sum(dims).reshape(-1),
                                   (xc * xc).sum(dims).reshape(-1), x.new_tensor([k])])
    group.reduce(slots)
    mean, m2, m = group_moments(slots[:, :H], slots[:, H:2 * H], slots[:, 2 * H:3 * H],
                                slots[:, 3 * H:])
    m = int(round(float(m)))
    check_batch_size(m)
    shape = (1,) * len(dims) + (H,)
    mean, var = mean.view(shape), (m2 / (m - correction)).view(shape)
    var_inv = (var + eps).rsqrt()
    xhat = (x - mean) * var_inv
    out = gain * xhat + bias
    return out, BatchNormCache(xhat, gain, var_inv, BatchNormStats(mean, var), correction,
                               group.reduce, m)


def batchnorm_backward_over_group(dout: Tensor, cache: BatchNormCache) -> tuple[Tensor, Tensor, Tensor]:
    """``batchnorm_backward`` over the group: sum(dy) and sum(dy * xhat) all-reduced (one
    collective), the global m, this process's dy and xhat; gain's and bias's gradients are this
    process's own sums."""
    dims = feature_dims(dout)
    H, m, c = dout.shape[-1], cache.m, cache.correction
    dbias = dout.sum(dims, keepdim=True)
    dgain = (dout * cache.xhat).sum(dims, keepdim=True)
    both = torch.cat([dbias.reshape(-1), dgain.reshape(-1)])
    cache.reduce(both)
    total_dbias, total_dgain = both[:H].view(dbias.shape), both[H:].view(dgain.shape)
    dx = cache.gain * cache.var_inv / m * (
        m * dout - total_dbias - m / (m - c) * cache.xhat * total_dgain)
    return dx, dgain, dbias


def batchnorm_apply(x: Tensor, gain: Tensor, bias: Tensor, stats: BatchNormStats,
                    eps: float = BN_EPS) -> Tensor:
    """Evaluation mode: gain * (x - mean) / sqrt(var + eps) + bias, folded into one
    multiply-add per element (x * scale + shift, scale and shift computed once per feature)."""
    scale = gain * (stats.var + eps).rsqrt()
    return torch.addcmul(bias - stats.mean * scale, x, scale)


class StatsAccumulator:
    """Mean and unbiased variance of a layer's input over a whole data set, fed in chunks.

    Sums are kept in float64, so that the whole set never needs to sit in memory at once and
    the variance does not lose its digits to cancellation.
    """

    def __init__(self):
        self.total = self.total_sq = None
        self.count = 0

    def add(self, x: Tensor) -> None:
        dims = feature_dims(x)
        s = x.sum(dims, dtype=torch.float64)
        sq = (x * x).sum(dims, dtype=torch.float64)
        if self.total is None:
            self.total, self.total_sq, self.shape, self.dtype = s, sq, (1,) * len(dims) + s.shape, x.dtype
        else:
            self.total += s
            self.total_sq += sq
        self.count += x.numel() // x.shape[-1]

    def stats(self) -> BatchNormStats:
        check_batch_size(self.count)
        m = self.count
        mean = self.total / m
        var = (self.total_sq - m * mean * mean) / (m - 1)
        return BatchNormStats(mean.view(self.shape).to(self.dtype),
                              var.clamp_min(0).view(self.shape).to(self.dtype))


class LayerNormCache(NamedTuple):
    xhat: Tensor    # like x (... x C), (x - mean) * rstd: all the backward needs of x and mean
    weight: Tensor  # C
    rstd: Tensor    # ... x 1, 1/sqrt(var + eps), one per row


def layernorm_forward(x: Tensor, weight: Tensor, bias: Tensor, eps: float = LN_EPS
                      ) -> tuple[Tensor, LayerNormCache]:
    """out = weight * (x - mean) / sqrt(var + eps) + bias, the mean and the biased variance
    (divide by C) over the last dimension of x (... x C), one pair per row."""
    # two passes (the mean, then the mean square about it) rather than torch.var_mean, which on
    # a CPU is far slower over a last dimension this short (the README's Speed section)
    xc = x - x.mean(-1, keepdim=True)
    rstd = (xc * xc).mean(-1, keepdim=True).add_(eps).rsqrt_()
    xhat = xc * rstd
    return torch.addcmul(bias, xhat, weight), LayerNormCache(xhat, weight, rstd)


def layernorm_backward(dout: Tensor, cache: LayerNormCache) -> tuple[Tensor, Tensor, Tensor]:
    """Per row, with dxhat = dout * weight and means over the C features:

        dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))

    The two means are the gradients through the row's mean and variance: dx is orthogonal to
    ones and to xhat in each row, as out does not change when a row is shifted or scaled.
    weight and bias are shared by every row, so their gradients sum dout * xhat and dout over
    the rows. xhat and rstd are cached (rstd is one number per row); x and the mean are not,
    since xhat already carries them. A constant upstream gradient with weight 1 (the usual
    initialisation) makes dxhat constant along each row, so the true dx is 0 and a backward
    that dropped the xhat * mean(dxhat * xhat) term (mean(xhat) = 0) would still give 0: the
    registry uses a random dout and a weight != 1.
    """
    c = dout.shape[-1]
    dbias = dout.reshape(-1, c).sum(0)
    dweight = (dout * cache.xhat).reshape(-1, c).sum(0)
    dxhat = dout * cache.weight
    dx = cache.rstd * (dxhat - dxhat.mean(-1, keepdim=True)
                       - cache.xhat * (dxhat * cache.xhat).mean(-1, keepdim=True))
    return dx, dweight, dbias
