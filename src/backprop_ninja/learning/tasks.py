"""The lecture's exercises 1 to 4 on its check batch: what each backward gets, autograd's
gradients, and the mistakes the hints recognise.

Dimension letters: n batch, T block_size, E n_embd, H n_hidden, V vocab size.
"""

from __future__ import annotations


from ..checking import atomic
from ..checking.models import autograd_param_grads
from ..models import mlp
from .exercises import TITLES
from .grading import Task
from .hints import (Context, exercise1_alternatives, exercise2_alternatives,
                    exercise3_alternatives, exercise4_alternatives)
from .race import exercise4_forward

# exercise 4's gradients in the order its backward pass reaches them
EXERCISE4_NAMES = ("W2", "b2", "bngain", "bnbias", "W1", "b1", "C")


def make_task(number: int, s: atomic.CheckSetup) -> Task:
    """Exercise ``number`` on setup ``s``: what its backward gets and autograd's answer."""
    if number == 4:
        return exercise4_task(s)
    values, ref = atomic.autograd_reference(s.params, s.Xb, s.Yb)
    ctx = Context(s.Xb.shape[0], s.Xb, {**s.params, **values}, ref, {})
    if number == 1:
        return Task(TITLES[1], atomic.EXERCISE1_NAMES,
                    {"Xb": s.Xb, "Yb": s.Yb, **s.params, **values}, ctx, exercise1_alternatives)
    if number == 2:
        return Task(TITLES[2], ("logits",), {"logits": values["logits"], "Yb": s.Yb}, ctx,
                    exercise2_alternatives)
    inputs = {"hprebn": values["hprebn"], "bngain": s.params["bngain"],
              "bnvar_inv": values["bnvar_inv"], "bnraw": values["bnraw"],
              "dhpreact": ref["hpreact"]}
    return Task(TITLES[3], ("hprebn",), inputs, ctx, exercise3_alternatives)


def exercise4_task(s: atomic.CheckSetup) -> Task:
    values = exercise4_forward(s.params, s.Xb, s.Yb)
    ref = autograd_param_grads(mlp.SPEC, s.params, s.Xb, s.Yb)
    ctx = Context(s.Xb.shape[0], s.Xb, {**s.params, **values, "Yb": s.Yb}, ref, {})
    inputs = {"Xb": s.Xb, "Yb": s.Yb, **s.params, **values}
    return Task(TITLES[4] + "\none batch against autograd:", EXERCISE4_NAMES, inputs, ctx,
                exercise4_alternatives)
