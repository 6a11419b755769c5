"""Parameters and gradients in flat buffers, and the update rules that work on them.

With every parameter a view into one flat tensor and every gradient a view into another, an
optimiser step is a handful of kernels whatever the number of parameters: at the lecture's size
a kernel launch costs about as much as the arithmetic it does.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..models.base import Params


def views(flat: Tensor, like: Params) -> Params:
    """Views into ``flat`` shaped and named like ``like``, in its order."""
    out, start = {}, 0
    for name, p in like.items():
        out[name] = flat[start:start + p.numel()].view(p.shape)
        start += p.numel()
    return out


class FlatParams:
    """A copy of the parameters in one flat buffer (``flat``, viewed as ``params``) and a
    same-sized gradient buffer (``grad``, viewed as ``grads``)."""

    def __init__(self, params: Params):
        self.flat = torch.cat([p.detach().reshape(-1) for p in params.values()])
        self.grad = torch.zeros_like(self.flat)
        self.params = views(self.flat, params)
        self.grads = views(self.grad, params)

    def sgd(self, lr: float) -> None:
        """Plain SGD, the lecture's: p -= lr * dp, for every parameter in one kernel."""
        self.flat.add_(self.grad, alpha=-lr)
