"""Exercise 4's training race: the learner's backward trains the network for a few hundred SGD
steps, and its loss is compared with the same run on the model's own gradients (same start, same
batches, the project's one SGD update, ``training.optim``).

It has two sides. ``learner_run`` calls the learner's backward at every step of their run and
keeps the gradients it returned (in the check's child process, or in this one); ``replay``, the
checker's side, replays that run from the same start with those gradients, measures each step's
loss itself and runs the reference beside it. The verdict is the replay's.

Dimension letters: n batch, T block_size, E n_embd, H n_hidden, V vocab size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import torch
from torch import Tensor

from ..data import Dataset
from ..models import mlp
from ..models.base import Params, loss_and_grads
from ..training import threads
from ..training.optim import SGD, FlatParams, OptimConfig
from .learner import LearnerError, call_learner

PLAIN_SGD = OptimConfig("sgd")
TOLERANCE = 0.05


def exercise4_forward(p: Params, Xb: Tensor, Yb: Tensor) -> dict[str, Tensor]:
    """The intermediates of the model's training forward, by the names exercise 4's starter
    file uses (a test keeps that file's forward in step with this)."""
    r = mlp.forward(p, Xb, Yb)
    bn, embcat = r.cache.bn, r.cache.lin1.x
    return dict(emb=embcat.view(r.cache.emb_shape), embcat=embcat, hprebn=r.acts["hprebn"],
                bnmean=bn.stats.mean, bnvar=bn.stats.var, bnvar_inv=bn.var_inv, bnraw=bn.xhat,
                hpreact=r.acts["hpreact"], h=r.acts["h"], logits=r.logits, loss=r.loss)


@dataclass
class TrainingPlan:
    """The run both sides train: the start, the batches (``steps`` x n x T and ``steps`` x n) and
    the learning rate."""

    init: dict[str, Tensor]
    X: Tensor
    Y: Tensor
    lr: float = 0.1

    @property
    def steps(self) -> int:
        return self.X.shape[0]


def make_plan(data: Dataset, check_cfg: mlp.Config, steps: int = 500, lr: float = 0.1,
              batch_size: int = 32, seed: int = 1) -> TrainingPlan:
    Xtr, Ytr = data.splits["train"]
    cfg = mlp.Config(data.vocab.size, check_cfg.block_size, check_cfg.n_embd, check_cfg.n_hidden)
    g = torch.Generator().manual_seed(seed)
    ix = torch.stack([torch.randint(0, Xtr.shape[0], (batch_size,), generator=g)
                      for _ in range(steps)])
    init = mlp.init(cfg, torch.Generator().manual_seed(mlp.LECTURE_SEED))
    return TrainingPlan(init, Xtr[ix], Ytr[ix], lr)


def complete(gradients: Mapping, params: Mapping[str, Tensor]) -> bool:
    """Whether ``gradients`` has a floating tensor of each parameter's shape: worth training."""
    return all(isinstance(gradients.get(name), Tensor) and gradients[name].is_floating_point()
               and gradients[name].shape == p.shape for name, p in params.items())


def learner_run(fn: Callable, code, plan: TrainingPlan) -> dict[str, Tensor]:
    """Train with the learner's backward; each step's gradients, stacked by parameter. Their
    error (or a gradient of the wrong shape) raises LearnerError."""
    mine = FlatParams(plan.init)
    steps: list[dict[str, Tensor]] = []
    with single_thread():
        for X, Y in zip(plan.X, plan.Y):
            values = exercise4_forward(mine.params, X, Y)
            grads = call_learner(fn, code, {"Xb": X, "Yb": Y, **mine.params, **values})
            for name, p in mine.params.items():
                if not isinstance(grads.get(name), Tensor) or grads[name].shape != p.shape:
                    raise LearnerError(f"during training, backward() returned no gradient of "
                                       f"{name}'s shape {list(p.shape)} on a batch other than "
                                       "the check's")
            sgd_step(mine, grads, plan.lr)
            steps.append({name: grads[name].detach().to(p.dtype) for name, p in plan.init.items()})
    return {name: torch.stack([s[name] for s in steps]) for name in plan.init}


@dataclass
class Race:
    steps: int
    mine: list[float]
    reference: list[float]
    tolerance: float
    window: int = 100

    def final(self, losses: list[float]) -> float:
        tail = losses[-self.window:]
        return sum(tail) / len(tail)

    @property
    def ok(self) -> bool:
        mine = self.final(self.mine)
        return mine == mine and mine <= self.final(self.reference) + self.tolerance

    def text(self) -> str:
        lines = [f"\ntraining {self.steps} SGD steps (batch 32, lr 0.1) with your gradients and "
                 "with the reference's, same batches:", "  step | your loss | reference"]
        for i in range(0, self.steps, self.steps // 5):
            lines.append(f"  {i:>4} | {self.mine[i]:>9.4f} | {self.reference[i]:>9.4f}")
        lines.append(f"  mean of the last {self.window}: yours {self.final(self.mine):.4f}, "
                     f"reference {self.final(self.reference):.4f}")
        lines.append("your gradients train the network, without autograd" if self.ok else
                     f"your loss does not fall like the reference's (more than {self.tolerance} "
                     "above it): look for a gradient that is right on one batch but not in general")
        return "\n".join(lines)


def replay(plan: TrainingPlan, training: Mapping[str, Tensor],
           tolerance: float = TOLERANCE) -> Race:
    """The learner's run again from the plan's start with the gradients they sent, the loss of
    each step measured here, beside the same run on the model's own gradients."""
    for name, p in plan.init.items():
        got = training.get(name)
        if not isinstance(got, Tensor) or not got.is_floating_point() or \
                tuple(got.shape) != (plan.steps, *p.shape):
            raise LearnerError(f"the training run sent back no gradients of {name} for its "
                               f"{plan.steps} steps")
    mine, ref = FlatParams(plan.init), FlatParams(plan.init)
    mine_losses, ref_losses = [], []
    with single_thread():
        for step, (X, Y) in enumerate(zip(plan.X, plan.Y)):
            mine_losses.append(mlp.forward(mine.params, X, Y).loss.item())
            sgd_step(mine, {name: g[step] for name, g in training.items()}, plan.lr)
            loss, ref_grads = loss_and_grads(mlp.SPEC, ref.params, X, Y)
            sgd_step(ref, ref_grads, plan.lr)
            ref_losses.append(loss.item())
    return Race(plan.steps, mine_losses, ref_losses, tolerance)


def sgd_step(buffers: FlatParams, grads: Params, lr: float) -> None:
    """The project's SGD update (``training.optim.SGD``) with these gradients."""
    for name, g in buffers.grads.items():
        g.copy_(grads[name])
    SGD(buffers, PLAIN_SGD).step(lr)


def single_thread():
    """Batch-32 tensors are too small to share out: a thread pool only adds waiting (a lot of it
    on a busy machine)."""
    return threads.using(1)
