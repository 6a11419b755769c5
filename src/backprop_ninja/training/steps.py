"""Training steps: one SGD step on a batch, by routes that must agree.

- ``fast``: the default. A model's fused step where it has one (``fused_mlp``, ``fused_wavenet``):
  the same hand-written math as the model's backward, as few kernels as possible into buffers
  allocated once. A model without one trains with its eager step.
- ``eager``: the model's layer-pair forward and backward, then SGD per parameter; the readable one.
- ``lecture`` (the MLP only): the lecture's atomic backward with its Python loop for dC, the
  exercise-1 solution (a speed baseline).
- ``autograd``: ``loss.backward()`` through the model's forward. A reference for checks and
  benchmarks only.

Every step takes the batch's row indices ``ix`` into the training examples and the learning rate,
updates its parameters (``step.params``) in place, and returns the batch loss (a 0-dim tensor,
computed before the update); ``step.grads`` then holds the batch's gradients. None but the
autograd step builds an autograd graph.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..checking import atomic
from ..models.base import ModelSpec, Params, loss_and_grads
from . import fused_mlp, fused_wavenet

FUSED = {"mlp": fused_mlp.FastStep, "wavenet": fused_wavenet.FastStep}


class EagerStep:
    """The readable step: the model's forward and backward, then SGD per parameter."""

    def __init__(self, spec: ModelSpec, params: Params, X: Tensor, Y: Tensor, batch_size: int):
        self.spec, self.X, self.Y = spec, X, Y
        self.params = {k: v.detach().clone() for k, v in params.items()}
        self.grads = {k: torch.zeros_like(v) for k, v in self.params.items()}

    def step(self, ix: Tensor, lr: float) -> Tensor:
        loss, self.grads = loss_and_grads(self.spec, self.params, self.X[ix], self.Y[ix])
        for name, p in self.params.items():
            p.add_(self.grads[name], alpha=-lr)
        return loss


class LectureStep(EagerStep):
    """The lecture's exercise-4 step: atomic forward, atomic backward with the Python dC loop."""

    def step(self, ix: Tensor, lr: float) -> Tensor:
        xb, yb = self.X[ix], self.Y[ix]
        t = atomic.atomic_forward(self.params, xb, yb)
        d = atomic.atomic_backward(self.params, xb, yb, t)
        self.grads = {name: d[name] for name in self.params}
        for name, p in self.params.items():
            p.add_(d[name], alpha=-lr)
        return t["loss"]


class AutogradStep(EagerStep):
    """Reference only: the same forward, gradients from ``loss.backward()``."""

    def __init__(self, spec: ModelSpec, params: Params, X: Tensor, Y: Tensor, batch_size: int):
        super().__init__(spec, params, X, Y, batch_size)
        for p in self.params.values():
            p.requires_grad_(True)

    def step(self, ix: Tensor, lr: float) -> Tensor:
        with torch.enable_grad():
            loss = self.spec.forward(self.params, self.X[ix], self.Y[ix]).loss
            for p in self.params.values():
                p.grad = None
            loss.backward()
        self.grads = {k: p.grad for k, p in self.params.items()}
        with torch.no_grad():
            for p in self.params.values():
                p.add_(p.grad, alpha=-lr)
        return loss.detach()


EXTRA_ROUTES = {"mlp": {"lecture": LectureStep}}


def routes(spec: ModelSpec) -> dict[str, type]:
    """The steps a model can train with, by route name (``--grad`` and the benchmark)."""
    return {"autograd": AutogradStep, **EXTRA_ROUTES.get(spec.name, {}), "eager": EagerStep,
            "fast": FUSED.get(spec.name, EagerStep)}


def make_step(route: str, spec: ModelSpec, params: Params, X: Tensor, Y: Tensor, batch_size: int):
    return routes(spec)[route](spec, params, X, Y, batch_size)
