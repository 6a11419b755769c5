"""Linear layer: out = x @ w (+ b), over any number of leading dimensions.

Dimension letters: D_in / D_out the sides of the layer; ``...`` any leading dimensions (n, or
n x T).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class LinearCache(NamedTuple):
    x: Tensor       # ... x D_in
    w: Tensor       # D_in x D_out
    has_bias: bool


def linear_forward(x: Tensor, w: Tensor, b: Tensor | None = None) -> tuple[Tensor, LinearCache]:
    """``b=None`` is the layer without bias (before a batchnorm, whose own bias makes it moot)."""
    if x.ndim == 2:
        out = torch.addmm(b, x, w) if b is not None else x @ w
    else:
        out = x @ w if b is None else torch.matmul(x, w) + b
    return out, LinearCache(x, w, b is not None)  # ... x D_out


def linear_backward(dout: Tensor, cache: LinearCache) -> tuple[Tensor, ...]:
    """Matmul backward is a matmul with a transpose; w and b are shared by every leading
    position, so their gradients sum over all of them. Returns (dx, dw, db), or (dx, dw)
    without bias."""
    d_in, d_out = cache.w.shape
    dx = dout @ cache.w.T                                            # ... x D_in
    dw = cache.x.reshape(-1, d_in).T @ dout.reshape(-1, d_out)      # D_in x D_out
    if not cache.has_bias:
        return dx, dw
    return dx, dw, dout.reshape(-1, d_out).sum(0)                    # D_out
