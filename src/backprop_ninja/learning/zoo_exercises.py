"""Exercises 5 to 8: the backward passes of the zoo's layers, graded like exercises 1 to 4.

5. layer normalisation (the transformer's), fused: dxhat, dweight, dbias, dx;
6. causal self-attention, one head at a time: dv, datt, dscores, dq, dk;
7. the WaveNet's batchnorm over dims (0, 1) of an n x T x C input: dgain, dbias, dx;
8. an RNN back through time: da (the loop), dx, dh0, dw, db.

Each has a template in ``templates/exerciseN.py`` (rendered like exercises 1 to 4, by
``exercises.render``) and a seeded problem: small float32 inputs with non-trivial gains and a
random upstream gradient (a constant one lets a backward that drops a term pass), whose
reference gradients autograd computes through a forward written here independently of the
template's (torch.nn.functional's layer_norm, the batchnorm from its definition, ...). The
learner's backward is called and graded by ``grading.call_and_grade``, so the first wrong
tensor is named with a hint from ``hints_zoo``.

Entry points for the command line: ``ZOO_TITLES``, ``ZOO_NAMES``, ``ZOO_CHECKS`` (number ->
``check_exerciseN(fn, path) -> Grade``), ``check_zoo(number, path) -> CheckResult`` (what
``checker.check`` returns for 1 to 4); ``--init`` and ``--show-solution`` are ``exercises``'
for all eight.

Dimension letters: n batch, T positions, C features, nh heads, hs head size, H hidden width.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import torch
from torch.nn import functional
from torch import Tensor

from ..errors import UserError
from .grading import CheckResult, Grade, Task, call_and_grade
from .learner import LearnerError, PyFile, learner_function, load_learner
from .exercises import TITLES
from .hints import Context
from .hints_zoo import (causal_mask, exercise5_alternatives, exercise6_alternatives,
                        exercise7_alternatives, exercise8_alternatives)

ZOO_TITLES = {n: TITLES[n] for n in (5, 6, 7, 8)}
# the tensors each backward returns gradients of, in backward order (one blank each)
ZOO_NAMES = {
    5: ("xhat", "weight", "bias", "x"),
    6: ("v", "att", "scores", "q", "k"),
    7: ("gain", "bias", "x"),
    8: ("a", "x", "h0", "w", "b"),
}
EPS = 1e-5
SEED = 5_678


# ---------------------------------------------------------------------------------------------
# the files

def check_zoo_number(number: int) -> None:
    if number not in ZOO_TITLES:
        raise UserError(f"the zoo's exercises are 5 to 8, not {number}")


# ---------------------------------------------------------------------------------------------
# the problems: inputs, autograd's gradients, and the values the hints recompute from

def generator(number: int) -> torch.Generator:
    return torch.Generator().manual_seed(SEED + number)


def randn(g: torch.Generator, *shape: int, scale: float = 1.0, shift: float = 0.0) -> Tensor:
    return torch.randn(*shape, generator=g) * scale + shift


def autograd_reference(forward: Callable, inputs: dict[str, Tensor], upstream: Tensor
                       ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """forward's intermediates (detached) and autograd's gradients of (out * upstream).sum()
    with respect to every input and every intermediate forward returns beside its output."""
    leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
    with torch.enable_grad():
        out, inner = forward(**leaves)
        for t in inner.values():
            t.retain_grad()
        (out * upstream).sum().backward()
    grads = {k: t.grad.detach() for k, t in {**leaves, **inner}.items()}
    return {k: t.detach() for k, t in inner.items()}, grads


def make_task(number: int, inputs: dict[str, Tensor], values: dict[str, Tensor],
              ref: dict[str, Tensor], alternatives) -> Task:
    """What the learner's backward gets (``inputs``), and what the hints need: every value by
    name (the inputs and the upstream gradient among them) and autograd's gradients."""
    x = next(iter(inputs.values()))  # the layer's input, n first: hints.factor_hint's n
    ctx = Context(x.shape[0], x, {**values, **inputs}, ref, {})
    return Task(ZOO_TITLES[number], ZOO_NAMES[number], inputs, ctx, alternatives)


def layernorm_reference(x: Tensor, weight: Tensor, bias: Tensor):
    xhat = functional.layer_norm(x, x.shape[-1:], eps=EPS)
    return weight * xhat + bias, {"xhat": xhat}


def exercise5_task(n: int = 4, T: int = 5, C: int = 8) -> Task:
    g = generator(5)
    x = randn(g, n, T, C, scale=2.0, shift=0.5)
    weight, bias = randn(g, C, scale=0.5, shift=1.0), randn(g, C, scale=0.3)
    dout = randn(g, n, T, C)
    values, ref = autograd_reference(layernorm_reference, dict(x=x, weight=weight, bias=bias), dout)
    rstd = (x.var(-1, keepdim=True, unbiased=False) + EPS).rsqrt()
    inputs = dict(x=x, weight=weight, xhat=values["xhat"], rstd=rstd, dout=dout)
    return make_task(5, inputs, values, ref, exercise5_alternatives)


def attention_reference(q: Tensor, k: Tensor, v: Tensor):
    """The masked softmax written out, so that the scores and att have gradients of their own
    (functional.scaled_dot_product_attention fuses them away; the tests compare its y with this one)."""
    T, hs = q.shape[-2:]
    scores = q @ k.transpose(-2, -1) * hs ** -0.5
    att = scores.masked_fill(~causal_mask(T), float("-inf")).softmax(-1)
    return att @ v, {"scores": scores, "att": att}


def exercise6_task(n: int = 4, nh: int = 2, T: int = 5, hs: int = 4) -> Task:
    g = generator(6)
    q, k, v = (randn(g, n, nh, T, hs) for _ in range(3))
    dy = randn(g, n, nh, T, hs)
    values, ref = autograd_reference(attention_reference, dict(q=q, k=k, v=v), dy)
    inputs = dict(q=q, k=k, v=v, att=values["att"], dy=dy)
    return make_task(6, inputs, values, ref, exercise6_alternatives)


def batchnorm_reference(x: Tensor, gain: Tensor, bias: Tensor):
    """Batchnorm from its definition: per feature, over all n*T values, Bessel's m - 1."""
    m = x.shape[0] * x.shape[1]
    mean = x.sum((0, 1), keepdim=True) / m
    var = ((x - mean) ** 2).sum((0, 1), keepdim=True) / (m - 1)
    xhat = (x - mean) / torch.sqrt(var + EPS)
    return gain * xhat + bias, {"xhat": xhat}


def exercise7_task(n: int = 4, T: int = 5, C: int = 8) -> Task:
    g = generator(7)
    x = randn(g, n, T, C, scale=2.0, shift=0.5) + randn(g, 1, T, C)  # positions differ
    gain, bias = randn(g, 1, 1, C, scale=0.5, shift=1.0), randn(g, 1, 1, C, scale=0.3)
    dout = randn(g, n, T, C)
    values, ref = autograd_reference(batchnorm_reference, dict(x=x, gain=gain, bias=bias), dout)
    var_inv = (x.var((0, 1), keepdim=True, unbiased=True) + EPS).rsqrt()
    inputs = dict(x=x, gain=gain, xhat=values["xhat"], var_inv=var_inv, dout=dout)
    return make_task(7, inputs, values, ref, exercise7_alternatives)


def rnn_reference(x: Tensor, h0: Tensor, w: Tensor, b: Tensor, a: Tensor):
    """The RNN as a Python loop with torch.cat. ``a`` is zeros added to every pre-activation:
    its gradient is theirs (they are T separate tensors, not one leaf)."""
    h, states = h0.expand(x.shape[0], -1), []
    for t in range(x.shape[1]):
        h = torch.tanh(torch.cat([x[:, t], h], 1) @ w + b + a[:, t])
        states.append(h)
    hs = torch.stack(states, 1)
    return hs, {"hs": hs}


def exercise8_task(n: int = 4, T: int = 5, C: int = 6, H: int = 8) -> Task:
    g = generator(8)
    x, h0 = randn(g, n, T, C), randn(g, H, scale=0.5)
    w, b = randn(g, C + H, H, scale=1.5 / math.sqrt(C + H)), randn(g, H, scale=0.2)
    dhs = randn(g, n, T, H)
    leaves = dict(x=x, h0=h0, w=w, b=b, a=torch.zeros(n, T, H))
    values, ref = autograd_reference(rnn_reference, leaves, dhs)
    inputs = dict(x=x, h0=h0, w=w, hs=values["hs"], dhs=dhs)
    return make_task(8, inputs, values, ref, exercise8_alternatives)


TASKS = {5: exercise5_task, 6: exercise6_task, 7: exercise7_task, 8: exercise8_task}


# ---------------------------------------------------------------------------------------------
# the checks

def check_task(number: int, fn: Callable, path: str | Path) -> Grade:
    """Call the learner's backward on exercise ``number``'s problem and grade it; an error in
    their code raises learner.LearnerError, already phrased for them."""
    return call_and_grade(TASKS[number](), fn, PyFile(Path(path)))


def check_exercise5(fn: Callable, path: str | Path) -> Grade:
    return check_task(5, fn, path)


def check_exercise6(fn: Callable, path: str | Path) -> Grade:
    return check_task(6, fn, path)


def check_exercise7(fn: Callable, path: str | Path) -> Grade:
    return check_task(7, fn, path)


def check_exercise8(fn: Callable, path: str | Path) -> Grade:
    return check_task(8, fn, path)


ZOO_CHECKS = {5: check_exercise5, 6: check_exercise6, 7: check_exercise7, 8: check_exercise8}


def check_zoo(number: int, path: str | Path) -> CheckResult:
    """Grade the learner's ``.py`` file, in this process, as ``checker.check`` does exercises 1
    to 4: its text is what the command prints, an error in the file one message."""
    check_zoo_number(number)
    path = Path(path)
    try:
        grade = ZOO_CHECKS[number](learner_function(load_learner(path), path), path)
    except LearnerError as e:
        return CheckResult(f"{ZOO_TITLES[number]}\n{e}", False)
    return CheckResult(grade.text(), grade.ok, grade)
