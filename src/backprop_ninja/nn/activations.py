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
    s: Tensor  # sigmoid(2u), u = sqrt(2/pi) * (x + 0.044715 x^3): the output is x * s


def gelu_forward(x: Tensor) -> tuple[Tensor, GeluCache]:
    """gelu(x) = 0.5 x (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3), computed as x * sigmoid(2u):
    the same function, since (1 + tanh(u)) / 2 = sigmoid(2u), and on a CPU torch's sigmoid is
    several times faster than its tanh (the README's Speed section has the figures)."""
    s = (x * x).mul_(2.0 * GELU_C * GELU_K).add_(2.0 * GELU_C).mul_(x).sigmoid_()   # sigmoid(2u)
    return x * s, GeluCache(x, s)


def gelu_backward(dout: Tensor, cache: GeluCache) -> tuple[Tensor]:
    """With s = sigmoid(2u):  d/dx (x s) = s + x s (1 - s) d(2u)/dx,  d(2u)/dx = 2 sqrt(2/pi) (1 + 3k x^2).

    The same derivative as 0.5 (1 + tanh u) + 0.5 x (1 - tanh^2 u) du/dx, written in s."""
    x, s = cache.x, cache.s
    dx = (x * x).mul_(6.0 * GELU_C * GELU_K).add_(2.0 * GELU_C).mul_(x)   # x d(2u)/dx
    dx.mul_(s).mul_(1.0 - s).add_(s)
    return (dx.mul_(dout),)
