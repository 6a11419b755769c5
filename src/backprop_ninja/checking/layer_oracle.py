"""The oracles of ``check-layer`` and the alternatives it diagnoses with.

- autograd of a differentiable forward (a reference, or the user's forward when autograd can
  follow it): every entry, in float64;
- central finite differences of the user's forward in float64: every entry of a tensor with up
  to ``FD_ALL`` entries, ``FD_SAMPLE`` random ones of a larger one.

``branch_grads`` splits an input's gradient into one part per use of the input in the forward
(each use given its own copy through a ``TorchFunctionMode``), so that a gradient that kept only
some of them (``=`` where ``+=`` belongs) can be named.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

from .gradcheck import central_difference

FD_ALL = 512
FD_SAMPLE = 256
FD_STEP = 1e-6


@dataclass
class Sampled:
    """Finite differences on some entries of a gradient: flat indices and their values."""

    index: Tensor | None      # None: every entry
    values: Tensor            # float64, flat


def as_float64(values: dict[str, object]) -> dict[str, object]:
    return {k: (v.detach().double().clone() if isinstance(v, Tensor) and v.is_floating_point()
                else v) for k, v in values.items()}


def autograd_truth(fn: Callable[..., Tensor], values: dict[str, object], dout: Tensor,
                   floats: list[str]) -> dict[str, Tensor]:
    """Autograd's float64 gradients of (fn(*values) * dout).sum() for every float input."""
    x = as_float64(values)
    for k in floats:
        x[k].requires_grad_(True)
    with torch.enable_grad():
        out = fn(*x.values())
        if not isinstance(out, Tensor) or tuple(out.shape) != tuple(dout.shape):
            raise ValueError("the oracle's output does not have the forward's shape")
        if not out.requires_grad:
            return {k: torch.zeros_like(x[k]) for k in floats}
        grads = torch.autograd.grad(out.double(), [x[k] for k in floats], dout.double(),
                                    allow_unused=True)
    return {k: (g if g is not None else torch.zeros_like(x[k])) for k, g in zip(floats, grads)}


def finite_differences(forward: Callable[..., Tensor], values: dict[str, object], dout: Tensor,
                       floats: list[str], generator: torch.Generator,
                       sample: int = FD_SAMPLE, every_entry: bool = False) -> dict[str, Sampled]:
    """Central differences of (forward(*values) * dout).sum() in float64."""
    x = as_float64(values)
    for k in floats:
        x[k] = x[k].contiguous()
    d = dout.detach().double()

    def objective() -> float:
        with torch.no_grad():
            return float((forward(*x.values()).double() * d).sum())

    out = {}
    for k in floats:
        flat = x[k].view(-1)
        n = flat.numel()
        if every_entry or n <= FD_ALL:
            index = None
            entries = range(n)
        else:
            index = torch.randperm(n, generator=generator)[:sample].sort().values
            entries = index.tolist()
        vals = torch.empty(len(entries), dtype=torch.float64)
        for j, i in enumerate(entries):
            vals[j] = central_difference(flat, i, objective, FD_STEP)
        out[k] = Sampled(index.to(x[k].device) if index is not None else None,
                         vals.to(x[k].device))
    return out


class SplitUses(TorchFunctionMode):
    """Gives every use of ``target`` in a forward its own leaf copy."""

    def __init__(self, target: Tensor):
        super().__init__()
        self.target = target
        self.uses: list[tuple[str, Tensor]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}

        def swap(a):
            if a is self.target:
                leaf = self.target.detach().clone().requires_grad_(True)
                self.uses.append((func_name(func), leaf))
                return leaf
            return a

        return func(*tree_map(swap, args), **tree_map(swap, kwargs))


def func_name(func) -> str:
    name = getattr(func, "__name__", None) or str(func)
    if name == "__get__":
        name = getattr(getattr(func, "__self__", None), "__name__", "attribute")
    return name.strip("_").removeprefix("r") if name.startswith("__r") else name.strip("_")


def branch_grads(fn: Callable[..., Tensor], values: dict[str, object], dout: Tensor,
                 name: str, limit: int = 6) -> list[tuple[str, Tensor]]:
    """The gradient of ``name`` through each of its uses in ``fn`` (those with a nonzero one):
    [(label, gradient)], or [] when it has fewer than two or more than ``limit``."""
    x = as_float64(values)
    target = x[name]
    mode = SplitUses(target)
    try:
        with torch.enable_grad(), mode:
            out = fn(*x.values())
        leaves = [leaf for _, leaf in mode.uses]
        if not leaves or not out.requires_grad:
            return []
        grads = torch.autograd.grad(out.double(), leaves, dout.double(), allow_unused=True)
    except Exception:  # a forward that does not survive the split (in-place ops): no branches
        return []
    used = [(label, g) for (label, _), g in zip(mode.uses, grads)
            if g is not None and g.abs().max() > 0]
    if not 2 <= len(used) <= limit:
        return []
    counts: dict[str, int] = {}
    labelled = []
    for label, g in used:
        counts[label] = counts.get(label, 0) + 1
        dup = sum(1 for other, _ in used if other == label) > 1
        labelled.append((f"{label}()" + (f" #{counts[label]}" if dup else ""), g))
    return labelled
