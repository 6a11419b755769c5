"""Gradient checking as a library feature: two independent oracles for a hand-written gradient.

1. autograd: ``compare`` reports, like the lecture's ``cmp``, whether the hand-written gradient is
   bit-exact, approximately equal (``approx_equal``, defined once below), the max abs difference,
   and whether the shapes agree. A shape mismatch is reported as such, never broadcast past, and
   something that is not a floating tensor is refused, never cast.
2. central finite differences in float64: ``finite_difference_grads`` and ``relative_error``.

Checks are driven through ``(out * dout).sum()`` with a random ``dout``: with ``out.mean()`` or a
constant dout the true input gradients of softmax and batchnorm are ~0, and a backward returning
zeros would pass.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Callable, Mapping

import torch
from torch import Tensor


# "Approximately equal", the one definition every check uses (``check``, ``--check-grads``, the
# exercise checker and its hints):  max|mine - ref| <= APPROX_ATOL + APPROX_RTOL * max|ref|,
# computed in float64. Why relative to the tensor's largest entry and not elementwise: two correct
# float32 formulas differ by rounding that scales with the sums they accumulate, so an entry that
# is near zero through cancellation carries the rounding of its large neighbours. Why an
# absolute floor: some true gradients are exactly zero (b1 under batchnorm, logit_maxes), and then
# both sides are float32 noise, measured at 1e-9 to 1e-8 from batch 32 to 4096; no formula can
# match noise. A real mistake is far above both (Bessel's n/(n-1) at n = 4096 is 2.4e-4 relative).
APPROX_RTOL = 1e-5
APPROX_ATOL = 1e-6


def approx_equal(got: Tensor, ref: Tensor) -> bool:
    """The project's "approximately equal" (see above); shapes must match exactly."""
    if tuple(got.shape) != tuple(ref.shape):
        return False
    if got.numel() == 0:
        return True
    a, b = got.detach().double(), ref.detach().double()
    return (a - b).abs().max().item() <= APPROX_ATOL + APPROX_RTOL * b.abs().max().item()


def gradient_problem(manual: object, reference: Tensor) -> str | None:
    """Why ``manual`` cannot be a gradient of ``reference`` at all, or None if it can be one.

    A gradient is a floating-point tensor on the reference's device. Anything else is refused
    before any arithmetic: comparing after a cast would truncate, e.g. an integer tensor of
    zeros would equal a reference whose entries are all below 1 in magnitude.
    """
    if manual is None:
        return "is missing (None)"
    if not isinstance(manual, Tensor):
        kind = type(manual)
        what = kind.__name__ if kind.__module__ == "builtins" else \
            f"{kind.__module__.split('.')[0]}.{kind.__name__}"
        return f"is a {what}, not a torch tensor"
    if manual.is_complex() or not manual.is_floating_point():
        return f"is a {str(manual.dtype).removeprefix('torch.')} tensor; a gradient is a " \
               f"floating-point tensor ({str(reference.dtype).removeprefix('torch.')}, like the tensor itself)"
    if manual.device != reference.device:
        return f"is on {manual.device}, but the tensor is on {reference.device}"
    return None


@dataclass(frozen=True)
class Comparison:
    """One row of a check table."""

    name: str
    exact: bool
    approx: bool
    maxdiff: float
    shape: tuple[int, ...] | None      # the hand-written gradient's shape (None: not a tensor)
    expected_shape: tuple[int, ...]
    problem: str | None = None         # why it is not a gradient at all (wrong type, dtype, device)

    @property
    def shape_ok(self) -> bool:
        return self.shape == self.expected_shape

    def as_dict(self) -> dict:
        d = asdict(self)
        d["shape"] = list(self.shape) if self.shape is not None else None
        d["expected_shape"] = list(self.expected_shape)
        d["shape_ok"] = self.shape_ok
        if math.isnan(self.maxdiff):
            d["maxdiff"] = None
        return d


def compare(name: str, manual: object, reference: Tensor) -> Comparison:
    """Compare a hand-written gradient with a reference one (the lecture's ``cmp``).

    exact: bit-for-bit equal values; approx: ``approx_equal``; maxdiff in float64. Something that
    is not a floating tensor on the reference's device, or has another shape, is reported as such
    and never cast or broadcast past.
    """
    expected_shape = tuple(reference.shape)
    problem = gradient_problem(manual, reference)
    if problem is not None:
        shape = tuple(manual.shape) if isinstance(manual, Tensor) else None
        return Comparison(name, False, False, math.nan, shape, expected_shape, problem)
    shape = tuple(manual.shape)
    if shape != expected_shape:
        return Comparison(name, False, False, math.nan, shape, expected_shape)
    a, b = manual.detach().double(), reference.detach().double()
    maxdiff = (a - b).abs().max().item() if a.numel() else 0.0
    return Comparison(name, bool(torch.equal(a, b)), approx_equal(a, b), maxdiff, shape,
                      expected_shape)


def format_table(rows: list[Comparison], title: str | None = None) -> str:
    """A human-readable table: name | exact | approximate | maxdiff (| shape when it is wrong)."""
    width = max([len(r.name) for r in rows] + [6])
    lines = [title] if title else []
    lines.append(f"{'tensor':<{width}} | exact | approx | maxdiff")
    for r in rows:
        if r.problem is not None:
            line = f"{r.name:<{width}} | {'-':<5} | {'-':<6} | d{r.name} {r.problem}"
        elif not r.shape_ok:
            line = (f"{r.name:<{width}} | {'False':<5} | {'False':<6} | shape {list(r.shape)}, "
                    f"expected {list(r.expected_shape)}")
        else:
            line = f"{r.name:<{width}} | {str(r.exact):<5} | {str(r.approx):<6} | {r.maxdiff:.3g}"
        lines.append(line)
    return "\n".join(lines)


def tables_to_json(tables: Mapping[str, list[Comparison]], **extra) -> str:
    out = {key: [r.as_dict() for r in rows] for key, rows in tables.items()}
    out.update(extra)
    return json.dumps(out, indent=2)


def autograd_grads(fn: Callable[..., Tensor], inputs: Mapping[str, Tensor],
                   dout: Tensor) -> dict[str, Tensor]:
    """Autograd's gradients of ``(fn(**inputs) * dout).sum()`` w.r.t. every floating input."""
    leaves = {k: (v.detach().clone().requires_grad_(True) if v.is_floating_point() else v)
              for k, v in inputs.items()}
    with torch.enable_grad():
        out = fn(**leaves)
        check_same_shape("dout", dout, out)
        (out * dout).sum().backward()
    return {k: v.grad for k, v in leaves.items() if v.is_floating_point()}


def finite_difference_grads(fn: Callable[..., Tensor], inputs: Mapping[str, Tensor],
                            dout: Tensor, h: float = 1e-6) -> dict[str, Tensor]:
    """Central differences of ``(fn(**inputs) * dout).sum()`` in float64, element by element."""
    x64 = {k: (v.detach().double().clone() if v.is_floating_point() else v) for k, v in inputs.items()}
    dout = dout.detach().double()

    def objective() -> float:
        with torch.no_grad():
            out = fn(**x64)
            check_same_shape("dout", dout, out)
            return float((out * dout).sum())

    grads = {}
    for name, x in x64.items():
        if not x.is_floating_point():
            continue
        g = torch.zeros_like(x)
        flat, gflat = x.view(-1), g.view(-1)
        for i in range(flat.numel()):
            gflat[i] = central_difference(flat, i, objective, h)
        grads[name] = g
    return grads


def central_difference(flat: Tensor, i: int, objective: Callable[[], float], h: float) -> float:
    """(f(x + h e_i) - f(x - h e_i)) / 2h for entry i of ``flat`` (a view of f's input), which is
    restored afterwards."""
    old = flat[i].item()
    flat[i] = old + h
    plus = objective()
    flat[i] = old - h
    minus = objective()
    flat[i] = old
    return (plus - minus) / (2 * h)


def relative_error(analytic: Tensor, numeric: Tensor) -> float:
    """||a - b|| / max(||a|| + ||b||, tiny): 0 for equal tensors, ~1 for unrelated ones."""
    check_same_shape("gradient", analytic, numeric)
    a, b = analytic.detach().double(), numeric.detach().double()
    denom = max((a.norm() + b.norm()).item(), 1e-30)
    return (a - b).norm().item() / denom


def check_same_shape(name: str, got: Tensor, expected: Tensor) -> None:
    if tuple(got.shape) != tuple(expected.shape):
        raise ValueError(f"shape mismatch for {name}: got {list(got.shape)}, "
                         f"expected {list(expected.shape)} (refusing to broadcast)")
