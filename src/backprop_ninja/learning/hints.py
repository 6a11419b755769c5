"""Hints: recognising the classic mistakes of a learner's backward pass.

A mistake is recognised by recomputing what it would have produced. The reference gradients of
the tensors above the first wrong one are right (the learner's match them), so e.g. a gradient
that kept only one branch equals that branch's contribution computed from the reference. The
recognisers that hold for any layer (shapes, factors, zeros, transposes, embedding rows, the
branch message) are in ``checking.diagnose``, shared with ``check-layer``; this module adds the
exercises' own alternatives.

Dimension letters: n batch, T block_size, E n_embd, H n_hidden, V vocab size.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ..checking.diagnose import bessel_message, branch_message, classic
from ..checking.diagnose import exception_hint as generic_exception_hint
from ..checking.gradcheck import approx_equal, gradient_problem
from ..nn.embedding import EmbeddingCache, embedding_backward
from ..nn.linear import LinearCache, linear_backward
from ..nn.losses import cross_entropy_backward, cross_entropy_forward
from ..nn.normalisation import BatchNormCache, BatchNormStats, batchnorm_backward

@dataclass
class Context:
    """What the hints need to recompute the classic mistakes: inputs, forward values, reference."""

    n: int
    Xb: Tensor
    values: dict[str, Tensor]     # forward intermediates and parameters, by name
    ref: dict[str, Tensor]        # autograd's gradients, by name
    got: dict[str, object]        # the learner's returned dict


def first_wrong_advice(name: str, ctx: Context, path: Path,
                       alternatives: Callable[[str, Context], list[tuple[Tensor, str]]]) -> str:
    value = ctx.got.get(name)
    if value is None:
        return missing_advice(name, ctx, path)
    problem = gradient_problem(value, ctx.ref[name])
    if problem is not None:
        return f"d{name} {problem}"
    hint = diagnose(name, value, ctx.ref[name], alternatives(name, ctx), ctx)
    return f"hint: {hint}" if hint else \
        f"d{name} differs from autograd's; recheck the local derivative and the chain rule"


def missing_advice(name: str, ctx: Context, path: Path) -> str:
    if name not in ctx.got:
        if f"d{name}" in ctx.got:
            return (f"the returned dict has 'd{name}': key each gradient by the tensor's name "
                    f"without the d, '{name}'")
        return f"the returned dict has no '{name}'; it needs every tensor's name as a key"
    blanks = blank_lines(path)
    if name not in blanks:
        return f"d{name} is None: it must be a tensor of {name}'s shape"
    advice = f"d{name} is still None: fill in the blank at line {blanks[name]}"
    first = min(blanks, key=blanks.get)
    if blanks[first] < blanks[name]:
        advice += f", after the first blank above it, d{first} at line {blanks[first]}"
    return advice


def blank_lines(path: Path) -> dict[str, int]:
    """Line numbers of the blanks still left in the file: ``d<name> = None``, by name."""
    pattern = re.compile(r"^\s*d(\w+)\s*=\s*None\b")
    found: dict[str, int] = {}
    for i, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        match = pattern.match(line)
        if match:
            found.setdefault(match.group(1), i)
    return found


# the tensors above the first wrong one are right (the learner's match them), so e.g. a gradient
# that kept only one branch equals that branch's contribution computed from the reference. The
# recognisers themselves are the project's, shared with check-layer (``checking.diagnose``).

def diagnose(name: str, got: Tensor, ref: Tensor, alternatives: list[tuple[Tensor, str]],
             ctx: Context) -> str | None:
    return classic(name, got, ref, alternatives, batch_factors(name, ctx.n),
                   indices=ctx.Xb if name == "C" else None)


def batch_factors(name: str, n: int) -> list[tuple[float, str]]:
    """The constant factors of a learner's gradient, with the batch size n: the loss is a mean."""
    return [(-1.0, "the sign is flipped"),
            (n, f"it is n = {n} times too big: the loss is a mean over the batch, so a 1/n "
                "belongs in it"),
            (1 / n, f"it is n = {n} times too small: the 1/n of the mean is in twice"),
            ((n - 1) / n, bessel_message(name)), (n / (n - 1), bessel_message(name))]


def exception_hint(e: BaseException) -> str | None:
    text = str(e)
    if "NoneType" in text:
        return "a gradient used on this line is still None: fill in the blanks above it first"
    hint = generic_exception_hint(e)
    if hint:
        return hint
    if "unexpected keyword argument" in text or "missing" in text and "argument" in text:
        return ("keep the arguments of backward() as the template names them: "
                "the checker passes them by keyword")
    return None


def exercise1_alternatives(name: str, ctx: Context) -> list[tuple[Tensor, str]]:
    v, r, n = ctx.values, ctx.ref, ctx.n
    if name == "counts":
        return [(v["counts_sum_inv"] * r["probs"], branch_message(name, "probs", "counts_sum")),
                (r["counts_sum"].expand_as(v["counts"]),
                 branch_message(name, "counts_sum", "probs"))]
    if name == "logits":
        argmax = F.one_hot(v["logits"].max(1).indices, v["logits"].shape[1])
        return [(argmax * r["logit_maxes"], branch_message(name, "logit_maxes", "norm_logits"))]
    if name == "bndiff":
        return [(v["bnvar_inv"] * r["bnraw"], branch_message(name, "bnraw", "bndiff2")),
                (2 * v["bndiff"] * r["bndiff2"], branch_message(name, "bndiff2", "bnraw"))]
    if name == "bndiff2":
        return [((1.0 / n * r["bnvar"]).expand_as(v["bndiff2"]), bessel_message(name))]
    if name == "hprebn":
        via_mean = (r["bnmeani"] / n).expand_as(v["hprebn"])
        return [(r["bndiff"], branch_message(name, "bndiff", "bnmeani")),
                (via_mean, branch_message(name, "bnmeani", "bndiff")),
                (r["bndiff"] + r["bnmeani"] / (n - 1), bessel_message(name))]
    return []


def exercise2_alternatives(name: str, ctx: Context) -> list[tuple[Tensor, str]]:
    probs = F.softmax(ctx.values["logits"], 1)
    return [(probs / ctx.n, "dlogits is softmax / n: the correct class also needs its -1 "
                            "(the derivative of -log p with respect to its own logit is p - 1)")]


def batchnorm_dx(v: dict[str, Tensor], dhpreact: Tensor, correction: int) -> Tensor:
    """The batchnorm layer's fused backward on exercise 3's values; correction 0 is the
    variance divided by n (the batchnorm paper's), 1 by n-1 (Bessel's, the lecture's)."""
    stats = BatchNormStats(None, None)  # the backward reads only xhat, gain and var_inv
    cache = BatchNormCache(v["bnraw"], v["bngain"], v["bnvar_inv"], stats, correction)
    return batchnorm_backward(dhpreact, cache)[0]


def exercise3_alternatives(name: str, ctx: Context) -> list[tuple[Tensor, str]]:
    dhpreact = ctx.ref["hpreact"]
    right = batchnorm_dx(ctx.values, dhpreact, correction=1)
    return [(batchnorm_dx(ctx.values, dhpreact, correction=0), bessel_message(name)),
            (right / ctx.values["bngain"], "dhprebn is missing the factor bngain: hpreact is "
                                           "bngain * bnraw + bnbias")]


def exercise4_alternatives(name: str, ctx: Context) -> list[tuple[Tensor, str]]:
    """The Bessel mistake in the fused batchnorm, carried down to W1, b1 and C."""
    if name not in ("W1", "b1", "C"):
        return []
    v = ctx.values
    (dlogits,) = cross_entropy_backward(1.0, cross_entropy_forward(v["logits"], v["Yb"])[1])
    dhpreact = (1.0 - v["h"] ** 2) * (dlogits @ v["W2"].T)
    dhprebn = batchnorm_dx(v, dhpreact, correction=0)
    dembcat, dW1, db1 = linear_backward(dhprebn, LinearCache(v["embcat"], v["W1"], True))
    emb_cache = EmbeddingCache(ctx.Xb, v["C"].shape[0])
    (dC,) = embedding_backward(dembcat.view(v["emb"].shape), emb_cache)
    wrong = {"W1": dW1, "b1": db1, "C": dC}[name]
    return [(wrong, f"d{name} is what dhprebn gives with 1 where the fused batchnorm formula has "
                    "n/(n-1): " + bessel_message("hprebn"))]


def passing_notes(ctx: Context, names: tuple[str, ...]) -> list[str]:
    """Exercise 1's max branch is ~0, so leaving it out passes; say so anyway."""
    got_logits, got_norm = ctx.got.get("logits"), ctx.got.get("norm_logits")
    if "logit_maxes" not in names or not all(isinstance(t, Tensor) for t in (got_logits, got_norm)):
        return []
    if got_logits.shape == got_norm.shape and torch.equal(got_logits, got_norm) \
            and approx_equal(got_logits, ctx.ref["logits"]):
        return ["dlogits equals dnorm_logits exactly: the branch through logit_maxes looks "
                "missing. Its gradient is ~0 (softmax does not change when a row is shifted), "
                "so the check passes; add it anyway"]
    return []
