"""Gradient checking as a library feature: two independent oracles for a hand-written gradient.

1. autograd: ``compare`` reports, like the lecture's ``cmp``, whether the hand-written gradient is
   bit-exact, approximately equal (``torch.allclose``), the max abs difference, and whether the
   shapes agree. A shape mismatch is reported as such, never broadcast past.
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


@dataclass(frozen=True)
class Comparison:
    """One row of a check table."""

    name: str
    exact: bool
    approx: bool
    maxdiff: float
    shape: tuple[int, ...] | None      # the hand-written gradient's shape (None: missing)
    expected_shape: tuple[int, ...]

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


def compare(name: str, manual: Tensor | None, reference: Tensor,
            rtol: float = 1e-5, atol: float = 1e-6) -> Comparison:
    """Compare a hand-written gradient with a reference one (the lecture's ``cmp``).

    approx is ``torch.allclose(rtol, atol)``. atol is 1e-6 rather than allclose's 1e-8 because
    some true gradients are exactly zero (b1 under batchnorm, logit_maxes): there both sides are
    float32 rounding noise of order 1e-8, and no formula can match noise.
    """
    expected_shape = tuple(reference.shape)
    if manual is None or not isinstance(manual, Tensor):
        return Comparison(name, False, False, math.nan, None, expected_shape)
    shape = tuple(manual.shape)
    if shape != expected_shape:
        return Comparison(name, False, False, math.nan, shape, expected_shape)
    manual = manual.detach()
    reference = reference.detach().to(manual.dtype)
    diff = (manual - reference).abs()
    maxdiff = diff.max().item() if diff.numel() else 0.0
    exact = bool(torch.equal(manual, reference))
    approx = bool(torch.allclose(manual, reference, rtol=rtol, atol=atol))
    return Comparison(name, exact, approx, maxdiff, shape, expected_shape)


def format_table(rows: list[Comparison], title: str | None = None) -> str:
    """A human-readable table: name | exact | approximate | maxdiff (| shape when it is wrong)."""
    width = max([len(r.name) for r in rows] + [6])
    lines = [title] if title else []
    lines.append(f"{'tensor':<{width}} | exact | approx | maxdiff")
    for r in rows:
        if r.shape is None:
            line = f"{r.name:<{width}} | {'-':<5} | {'-':<6} | missing (expected shape {list(r.expected_shape)})"
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
            old = flat[i].item()
            flat[i] = old + h
            plus = objective()
            flat[i] = old - h
            minus = objective()
            flat[i] = old
            gflat[i] = (plus - minus) / (2 * h)
        grads[name] = g
    return grads


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
