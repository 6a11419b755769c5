"""Elementwise nonlinearities: tanh, sigmoid, ReLU and the tanh approximation of GELU (GPT-2's)."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor


class TanhCache(NamedTuple):
    out: Tensor  # tanh(x): its derivative is 1 - out^2, so the input need not be kept


def tanh_forward(x: Tensor) -> tuple[Tensor, TanhCache]:
    out = torch.tanh(x)
    return out, TanhCache(out)


def tanh_backward(dout: Tensor, cache: TanhCache) -> tuple[Tensor]:
    return (dout * (1.0 - cache.out * cache.out),)


class SigmoidCache(NamedTuple):
    out: Tensor  # sigmoid(x): its derivative is out (1 - out), so the input need not be kept


def sigmoid_forward(x: Tensor) -> tuple[Tensor, SigmoidCache]:
    """out = 1 / (1 + exp(-x)), the GRU's gates."""
    out = torch.sigmoid(x)
    return out, SigmoidCache(out)


def sigmoid_backward(dout: Tensor, cache: SigmoidCache) -> tuple[Tensor]:
    """dx = dout * out * (1 - out). Elementwise, so no term cancels under a constant dout, but a
    constant dout would hide a dout read at the wrong element (transposed, broadcast, shifted):
    the check's random dout does not."""
    return (dout * cache.out * (1.0 - cache.out),)


class ReluCache(NamedTuple):
    positive: Tensor  # bool, x > 0: where the gradient passes


def relu_forward(x: Tensor) -> tuple[Tensor, ReluCache]:
    return torch.relu(x), ReluCache(x > 0)


def relu_backward(dout: Tensor, cache: ReluCache) -> tuple[Tensor]:
    """The gradient passes where x > 0 and stops elsewhere (at 0 too, as autograd does)."""
    return (dout * cache.positive,)


GELU_C = math.sqrt(2.0 / math.pi)
GELU_K = 0.044715


class GeluCache(NamedTuple):
    x: Tensor
    tanh_u: Tensor  # tanh(u), u = sqrt(2/pi) * (x + 0.044715 x^3); recomputing it costs a tanh


def gelu_forward(x: Tensor) -> tuple[Tensor, GeluCache]:
    """gelu(x) = 0.5 x (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3)."""
    tanh_u = torch.tanh(GELU_C * (x + GELU_K * x * x * x))
    return 0.5 * x * (1.0 + tanh_u), GeluCache(x, tanh_u)


def gelu_backward(dout: Tensor, cache: GeluCache) -> tuple[Tensor]:
    """d/dx = 0.5 (1 + tanh u) + 0.5 x (1 - tanh^2 u) du/dx,  du/dx = sqrt(2/pi) (1 + 3k x^2)."""
    x, t = cache.x, cache.tanh_u
    du = GELU_C * (1.0 + 3.0 * GELU_K * x * x)
    return (dout * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du),)
