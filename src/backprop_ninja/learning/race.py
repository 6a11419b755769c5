"""Exercise 4's training race: the learner's backward trains the network for a few hundred SGD
steps, and its loss is compared with the same run on the model's own gradients (same start, same
batches, the project's one SGD update, ``training.optim``).

Dimension letters: n batch, T block_size, E n_embd, H n_hidden, V vocab size.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from ..checking import atomic
from ..data import Dataset
from ..models import mlp
from ..models.base import Params, loss_and_grads
from ..training.optim import SGD, FlatParams, OptimConfig
from .grading import Grade, Task, call_and_grade
from .learner import LearnerError, call_learner
from .tasks import exercise4_forward


def grade_function(number: int, fn: Callable, code, task: Task, setup: atomic.CheckSetup,
                   data: Dataset | None) -> Grade:
    """Call the learner's backward on the check batch and grade it; for exercise 4, then train
    with it."""
    g = call_and_grade(task, fn, code)
    if number == 4:
        if not g.ok:
            g.messages.append("the training run waits until every gradient above is right")
            return g
        race = train_race(fn, code, data, setup.cfg)
        g.extra_ok = race.ok
        g.messages.append(race.text())
    return g


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


def train_race(fn: Callable, code, data: Dataset, check_cfg: mlp.Config,
               steps: int = 500, lr: float = 0.1, batch_size: int = 32, seed: int = 1,
               tolerance: float = 0.05) -> Race:
    """The same SGD run twice from the same start on the same batches: learner's grads, model's."""
    Xtr, Ytr = data.splits["train"]
    cfg = mlp.Config(data.vocab.size, check_cfg.block_size, check_cfg.n_embd, check_cfg.n_hidden)
    g = torch.Generator().manual_seed(seed)
    batches = [torch.randint(0, Xtr.shape[0], (batch_size,), generator=g) for _ in range(steps)]
    mine, ref = (FlatParams(mlp.init(cfg, torch.Generator().manual_seed(mlp.LECTURE_SEED)))
                 for _ in range(2))
    mine_losses, ref_losses = [], []
    with single_thread():
        for ix in batches:
            step_both(fn, code, mine, ref, Xtr[ix], Ytr[ix], lr, mine_losses, ref_losses)
    return Race(steps, mine_losses, ref_losses, tolerance)


def step_both(fn: Callable, code, mine: FlatParams, ref: FlatParams, X: Tensor, Y: Tensor,
              lr: float, mine_losses: list[float], ref_losses: list[float]) -> None:
    values = exercise4_forward(mine.params, X, Y)
    grads = call_learner(fn, code, {"Xb": X, "Yb": Y, **mine.params, **values})
    for name, p in mine.params.items():
        if not isinstance(grads.get(name), Tensor) or grads[name].shape != p.shape:
            raise LearnerError(f"during training, backward() returned no gradient of {name}'s "
                               f"shape {list(p.shape)} on a batch other than the check's")
    sgd_step(mine, grads, lr)
    mine_losses.append(values["loss"].item())
    loss, ref_grads = loss_and_grads(mlp.SPEC, ref.params, X, Y)
    sgd_step(ref, ref_grads, lr)
    ref_losses.append(loss.item())


def sgd_step(buffers: FlatParams, grads: Params, lr: float) -> None:
    """The project's SGD update (``training.optim.SGD``) with these gradients."""
    for name, g in buffers.grads.items():
        g.copy_(grads[name])
    SGD(buffers, PLAIN_SGD).step(lr)


PLAIN_SGD = OptimConfig("sgd")


@contextmanager
def single_thread():
    """Batch-32 tensors are too small to share out: a thread pool only adds waiting (a lot of it
    on a busy machine)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)
