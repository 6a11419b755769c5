"""Training steps: one SGD step on a batch, by routes that must agree.

- ``fast``: the default. A model's fused step where it has one (``fused_mlp``, ``fused_wavenet``):
  the same hand-written math as the model's backward, as few kernels as possible into buffers
  allocated once. A model without one trains with its eager step.
- ``eager``: the model's layer-pair forward and backward, then the optimiser; the readable one.
- ``lecture`` (the MLP only): the lecture's atomic backward with its Python loop for dC, the
  exercise-1 solution (a speed baseline).
- ``autograd``: ``loss.backward()`` through the model's forward. A reference for checks and
  benchmarks only.

Every step takes the batch's row indices ``ix`` into the training examples and the learning rate,
fills its gradients (``gradients(ix)``, twice with ``--sam``), updates its parameters (``step.params``, views into one flat buffer) with its optimiser
(``step.optimizer``, see ``optim``) in place, and returns the batch loss (a 0-dim tensor,
computed before the update); ``step.grads`` then holds the batch's gradients. None but the
autograd step builds an autograd graph.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..checking import atomic
from ..models.base import Dropout, ModelSpec, Params
from . import fused_mlp, fused_wavenet
from .distill import Teacher
from .optim import FlatParams, OptimConfig, descend, make_optimizer, sharpness_aware, views

FUSED = {"mlp": fused_mlp.FastStep, "wavenet": fused_wavenet.FastStep}


class EagerStep:
    """The readable step: the model's forward and backward, then the optimiser."""

    def __init__(self, spec: ModelSpec, params: Params, X: Tensor, Y: Tensor, batch_size: int,
                 opt: OptimConfig = OptimConfig(), dropout: Dropout | None = None,
                 teacher: Teacher | None = None):
        self.spec, self.X, self.Y, self.dropout, self.teacher = spec, X, Y, dropout, teacher
        self.buffers = FlatParams(params, opt.shards)
        self.params, self.grads = self.buffers.params, self.buffers.grads
        self.optimizer = make_optimizer(self.buffers, opt)
        self.sam = sharpness_aware(self.buffers, opt)

    def step(self, ix: Tensor, lr: float) -> Tensor:
        return descend(self.gradients, ix, lr, self.optimizer, self.sam)

    def loss_targets(self, ix: Tensor) -> dict:
        """The forward's keyword arguments for the batch's loss beyond its labels: with a teacher,
        its soft targets."""
        return {} if self.teacher is None else {"soft": self.teacher.batch(ix)}

    def gradients(self, ix: Tensor) -> Tensor:
        """The batch's gradients into ``grads``; returns its loss."""
        result = self.spec.forward(self.params, self.X[ix], self.Y[ix], dropout=self.dropout,
                                   **self.loss_targets(ix))
        for name, grad in self.spec.backward(result.cache).items():
            self.grads[name].copy_(grad)
        return result.loss


class LectureStep(EagerStep):
    """The lecture's exercise-4 step: atomic forward, atomic backward with the Python dC loop."""

    def gradients(self, ix: Tensor) -> Tensor:
        xb, yb = self.X[ix], self.Y[ix]
        t = atomic.atomic_forward(self.params, xb, yb)
        d = atomic.atomic_backward(self.params, xb, yb, t)
        for name, grad in self.grads.items():
            grad.copy_(d[name])
        return t["loss"]


class AutogradStep(EagerStep):
    """Reference only: the same forward and optimiser, gradients from ``loss.backward()``.

    The flat parameter buffer is the autograd leaf; the named parameters are views of it, made
    afresh under autograd each step, so the gradient arrives flat, where the optimiser wants it.
    """

    def gradients(self, ix: Tensor) -> Tensor:
        flat = self.buffers.flat
        with torch.enable_grad():
            flat.requires_grad_(True)
            loss = self.spec.forward(views(flat, self.params), self.X[ix], self.Y[ix],
                                     dropout=self.dropout, **self.loss_targets(ix)).loss
            (grad,) = torch.autograd.grad(loss, flat)
        flat.requires_grad_(False)
        self.buffers.grad.copy_(grad)
        return loss.detach()


EXTRA_ROUTES = {"mlp": {"lecture": LectureStep}}


def routes(spec: ModelSpec) -> dict[str, type]:
    """The steps a model can train with, by route name (``--grad`` and the benchmark)."""
    return {"autograd": AutogradStep, **EXTRA_ROUTES.get(spec.name, {}), "eager": EagerStep,
            "fast": FUSED.get(spec.name, EagerStep)}


def make_step(route: str, spec: ModelSpec, params: Params, X: Tensor, Y: Tensor, batch_size: int,
              opt: OptimConfig = OptimConfig(), dropout: Dropout | None = None,
              teacher: Teacher | None = None):
    """A step of the route; ``dropout`` and ``teacher`` for a model that takes them (and then the
    fast route is its eager step: the fused steps are of models with neither)."""
    step = routes(spec)[route]
    if teacher is None:
        return step(spec, params, X, Y, batch_size, opt, dropout)
    assert spec.soft_targets and issubclass(step, EagerStep), (spec.name, route)
    return step(spec, params, X, Y, batch_size, opt, dropout, teacher)
