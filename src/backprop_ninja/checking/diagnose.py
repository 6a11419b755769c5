"""Naming the classic mistakes of a hand-written gradient, for any layer.

A mistake is recognised by recomputing what it would have produced and comparing with the one
definition of approximately equal (``gradcheck.approx_equal``): a gradient that is the right
one times -1 had its sign flipped; one of the broadcast result's shape that sums down to the
right one is missing that sum; one that equals an alternative recomputed by the caller (the
gradient through one branch only, the one for an all-ones upstream gradient, another input's)
made that mistake. The exercise checker (``learning.hints``) and ``check-layer``
(``checking.layer``) both diagnose through ``classic``; each supplies its own alternatives and
the sizes a constant factor may come from.
"""

from __future__ import annotations

import re
from typing import Iterable, Sequence

import torch
from torch import Tensor

from .gradcheck import approx_equal

Alternatives = list[tuple[Tensor, str]]
Factors = Sequence[tuple[float, str]]


TRANSPOSE_HINT = ("a matmul backward is a matmul with a transpose: for out = x @ W, "
                  "dx = dout @ W.T and dW = x.T @ dout (each shape tells you which)")


def classic(name: str, got: Tensor, ref: Tensor, alternatives: Alternatives = (),
            factors: Factors = (), indices: Tensor | None = None) -> str | None:
    """The classic mistake that turns ``ref`` (the right gradient of ``name``) into ``got``, in
    words, or None when none is recognised. In order: the shape (a dropped keepdim, a missing
    sum over a broadcast dim, a transpose), nan or inf, all zeros, the caller's alternatives (the
    first that matches), embedding rows assigned instead of added (``indices``: the looked-up
    rows), a transpose of the values, a constant factor (``factors``: the known ones, by value)."""
    if tuple(got.shape) != tuple(ref.shape):
        return shape_hint(name, got, ref)
    got = got.detach().to(ref.dtype)
    hint = value_hint(name, got, ref)
    if hint:
        return hint
    for alternative, message in alternatives:
        if approx_equal(got, alternative):
            return message
    if indices is not None:
        hint = embedding_hint(got, ref, indices)
        if hint:
            return hint
    if got.ndim >= 2 and got.shape[-1] == got.shape[-2] and \
            approx_equal(got, ref.transpose(-2, -1)):
        return TRANSPOSE_HINT
    return factor_hint(name, got, ref, factors)


def value_hint(name: str, got: Tensor, ref: Tensor) -> str | None:
    """nan or inf, or all zeros where the right gradient is not."""
    if not torch.isfinite(got).all():
        return f"d{name} contains nan or inf: look for a division by zero or a log of zero"
    if not got.any() and ref.abs().max() > 1e-6:
        return (f"d{name} is all zeros: was it started with zeros_like and never written, "
                "or multiplied by a gradient that is still zero?")
    return None


# ---------------------------------------------------------------------------------------------
# shapes

def shape_hint(name: str, got: Tensor, ref: Tensor) -> str:
    """Why ``got`` has another shape than ``ref``: a transpose, a dimension of size 1 dropped
    (keepdim) or added, the broadcast result's shape (a missing sum over the broadcast dims)."""
    gs, rs = tuple(got.shape), tuple(ref.shape)
    if len(gs) == 2 and gs == rs[::-1]:
        return f"d{name} has shape {list(gs)}, the transpose of {list(rs)}: {TRANSPOSE_HINT}"
    if squeeze_shape(gs) == squeeze_shape(rs):
        values = " (the values are right)" if approx_equal(got.detach().reshape(rs), ref) else ""
        if len(gs) < len(rs):
            return (f"d{name} has shape {list(gs)} but {name} is {list(rs)}{values}: a "
                    f"dimension of size 1 was dropped{dropped_dims_text(gs, rs)}. Sum with "
                    "keepdim=True; broadcasting would hide the missing dim and silently pair up "
                    "the wrong entries further down")
        return (f"d{name} has shape {list(gs)} but {name} is {list(rs)}{values}: it has an extra "
                f"dimension of size 1; {name} is {len(rs)}-D, so sum without keepdim")
    summed = sum_to_shape(got.detach(), rs)
    if summed is not None:
        dims = broadcast_dims(gs, rs)
        right = " Summing yours over it gives the right answer." \
            if approx_equal(summed, ref) else ""
        return (f"d{name} has shape {list(gs)}, the shape of the broadcast result: {name} "
                f"{list(rs)} was broadcast along dim {dims} in the forward pass, so its gradient "
                f"is a sum over that dim (keeping {name}'s shape).{right}")
    return f"d{name} must have the shape of {name}, {list(rs)}; it has {list(gs)}"


def dropped_dims_text(got: tuple[int, ...], ref: tuple[int, ...]) -> str:
    """' (dim d)': which size-1 dims of ``ref`` are missing from ``got`` (a greedy alignment)."""
    missing, j = [], 0
    for i, s in enumerate(ref):
        if j < len(got) and got[j] == s and not (s == 1 and len(ref) - i > len(got) - j):
            j += 1
        else:
            missing.append(i)
    if not missing or j != len(got):
        return ""
    return f" (dim {missing[0]})" if len(missing) == 1 else f" (dims {missing})"


def squeeze_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(s for s in shape if s != 1)


def broadcast_dims(big: tuple[int, ...], small: tuple[int, ...]) -> list[int]:
    """The dims of `big` along which a tensor of shape `small` was broadcast to make `big`."""
    lead = len(big) - len(small)
    pairs = enumerate(zip(big[lead:], small))
    return list(range(lead)) + [lead + i for i, (b, s) in pairs if b != s]


def sum_to_shape(x: Tensor, shape: tuple[int, ...]) -> Tensor | None:
    """x summed down to `shape` if `shape` broadcasts to x's shape, else None."""
    lead = x.ndim - len(shape)
    if lead < 0 or any(s not in (1, b) for b, s in zip(x.shape[lead:], shape)):
        return None
    dims = broadcast_dims(tuple(x.shape), shape)
    return x.sum(dims, keepdim=True).reshape(shape) if dims else x


# ---------------------------------------------------------------------------------------------
# constant factors

def scale_of(got: Tensor, ref: Tensor) -> float | None:
    """s such that got = s * ref (approximately equal), or None when there is none."""
    ref = ref.detach().double()
    got = got.detach().double()
    if ref.abs().max() < 1e-6:
        return None
    s = ((got * ref).sum() / (ref * ref).sum()).item()
    return s if approx_equal(got, s * ref) else None


def factor_hint(name: str, got: Tensor, ref: Tensor, factors: Factors) -> str | None:
    """got = s * ref for a constant s: name it when it is one of ``factors`` (value, text), and
    say a constant factor is off otherwise (None when got is no multiple of ref)."""
    s = scale_of(got, ref)
    if s is None:
        return None
    for value, text in factors:
        if abs(s - value) < 1e-3 * abs(value):
            return f"d{name} is the right answer times {s:.4g}: {text}"
    return f"d{name} is the right answer times {s:.4g}: a constant factor is off"


def size_factors(name: str, sizes: Iterable[tuple[int, str]]) -> list[tuple[float, str]]:
    """The constant factors a layer's backward classically gets wrong, for every size ``n`` that
    the layer has (with what it is the size of, e.g. "dim 1 of x"): -1, 2, 1/2, n, 1/n and
    n/(n-1) or (n-1)/n."""
    known = [(-1.0, "the sign is flipped"),
             (2.0, "it is twice the right answer: a factor 2 is in it once too often (the "
                   "derivative of x**2 is 2x, not 4x, and a term counted twice doubles)"),
             (0.5, "it is half the right answer: a factor 2 is missing (the derivative of x**2 "
                   "is 2x)")]
    seen: set[int] = set()
    for n, what in sizes:
        if n <= 2 or n in seen:
            continue
        seen.add(n)
        known += [(float(n), f"it is {n} times too big, {n} being the size of {what}: a 1/{n} "
                             "(the mean's) is missing"),
                  (1 / n, f"it is {n} times too small, {n} being the size of {what}: a 1/{n} is "
                          "in it once too often"),
                  ((n - 1) / n, f"it divides by n = {n} (the size of {what}) where n-1 = "
                                f"{n - 1} belongs: {bessel_message(name, n)}"),
                  (n / (n - 1), f"it divides by n-1 = {n - 1} where n = {n} (the size of "
                                f"{what}) belongs: {bessel_message(name, n)}")]
    return known


def bessel_message(name: str, n: int | None = None) -> str:
    count = "n" if n is None else f"n = {n}"
    return (f"d{name} mixes up n and n-1: the batch variance divides by n-1 (Bessel's "
            f"correction), the mean by {count}; in the fused formula that is the n/(n-1) factor")


# ---------------------------------------------------------------------------------------------
# branches, embeddings, exceptions

def branch_message(name: str, kept: str, lost: str) -> str:
    return (f"d{name} is only the gradient through {kept}: {name} also feeds {lost}. A tensor "
            "used on several branches adds up the gradient of each (+=); an = overwrote one")


def embedding_hint(got: Tensor, ref: Tensor, indices: Tensor, table: str = "C",
                   looked_up: str = "Xb") -> str | None:
    """Rows looked up once right, rows looked up several times wrong: assigned, not accumulated."""
    uses = torch.bincount(indices.reshape(-1).long(), minlength=ref.shape[0])
    if uses.shape[0] != ref.shape[0]:
        return None
    once, many = uses <= 1, uses > 1
    if many.any() and approx_equal(got[once], ref[once]) and not approx_equal(got[many], ref[many]):
        return (f"d{table} is right for the rows of {table} looked up once and wrong for rows "
                "looked up several times: each lookup adds its gradient to the row (+= in the "
                f"loop, or index_add_); an assignment like d{table}[{looked_up}] = demb keeps only "
                "one of them")
    return None


SIZE_MISMATCH = re.compile(r"size of tensor a \((\d+)\) must match the size of tensor b "
                           r"\((\d+)\) at non-singleton dimension (\d+)")


def exception_hint(e: BaseException) -> str | None:
    """What a backward's exception most likely means, for the errors that classic mistakes
    raise: a matmul that needed a transpose, shapes that do not line up (a dropped keepdim)."""
    text = str(e)
    if "cannot be multiplied" in text:
        return TRANSPOSE_HINT
    match = SIZE_MISMATCH.search(text)
    if match:
        a, b, dim = match.groups()
        return (f"a tensor of {a} entries met one of {b} along dim {dim} of the broadcast: a "
                "reduction without keepdim=True (its dim dropped, so broadcasting lines it up "
                "with the wrong dim), or a missing transpose")
    if "must match the size" in text or "shape" in text and "invalid" in text:
        return "the shapes do not line up: each gradient must have the shape of its tensor"
    return None
