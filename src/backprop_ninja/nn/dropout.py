"""Inverted dropout: keep each value with probability 1 - p and scale the kept ones by 1/(1-p),
so the expected output is x and evaluation needs no rescaling (it calls the layer with p = 0).

The mask comes from an explicit generator, so a step is reproducible from its seed; it is drawn
in float32 whatever x's dtype, so the same seed gives the same mask in float32 and float64.
Inside ``group.over_group`` (data-parallel training) every process draws the mask of the whole
global batch, world x k rows from the run's generator as one process would, and keeps its own k
rows: the group then uses one process's masks, and every generator stays in step. The price:
every rank draws as many random numbers as one process does for the whole batch.

Dimension letters: any shape; the mask has x's shape.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ..errors import UserError
from .group import current as current_group


class DropoutCache(NamedTuple):
    mult: Tensor | None  # like x: 1/(1-p) where kept, 0 where dropped (None for p == 0: all pass)


def dropout_forward(x: Tensor, p: float, generator: torch.Generator
                    ) -> tuple[Tensor, DropoutCache]:
    """out = x * mult, mult[i] = (u[i] >= p) / (1 - p), u uniform in [0, 1) from ``generator``.
    p == 0 returns x itself and draws nothing (the generator is left as it was)."""
    if not 0.0 <= p < 1.0:
        raise UserError(f"--dropout must be at least 0 and below 1, got {p}: it is the "
                        "probability of zeroing a value (1 would zero them all)")
    if p == 0.0:
        return x, DropoutCache(None)
    group = current_group()
    if group is None or group.world == 1:
        u = torch.rand(x.shape, generator=generator, dtype=torch.float32, device=x.device)
    else:  # the global batch's mask, this process's rows of it
        k = x.shape[0]
        u = torch.rand((group.world * k, *x.shape[1:]), generator=generator, dtype=torch.float32,
                       device=x.device)[group.rank * k:(group.rank + 1) * k]
    mult = u.ge_(p).to(x.dtype).mul_(1.0 / (1.0 - p))
    return x * mult, DropoutCache(mult)


def dropout_backward(dout: Tensor, cache: DropoutCache) -> tuple[Tensor]:
    """dx = dout * mult: the forward's own mask, kept scaled in x's dtype (one multiply each
    way; a bool mask would cost a conversion and a second multiply on every use) rather than
    redrawn, since redrawing would need the generator's state from before the forward. With
    p == 0 this is the identity. No term can hide under a constant upstream gradient (dx is
    then the scaled mask itself); the mistake to guard against is a backward with another
    mask, which the registry catches because its reference draws the mask from the same seed."""
    if cache.mult is None:
        return (dout,)
    return (dout * cache.mult,)
