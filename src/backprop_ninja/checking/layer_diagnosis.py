"""The diagnosis of ``check_layer``: for every wrong input, what is wrong, in words.

The first check an input fails decides the kind of answer: an error or a gradient that is no
gradient (wrong type, dtype) is said as it is; wrong only in float32, only for another memory
layout or only with the same tensor passed twice gets its own sentence; wrong values are
diagnosed with ``diagnose.classic`` and the alternatives recomputed here from the oracle: the
sign flipped, dout ignored (the gradient for an all-ones dout), two inputs' gradients swapped, a
square input (or dout) used where its transpose belongs, and, when autograd can follow the
oracle, the gradient through only some of the input's uses in the forward (``branch_grads``:
= where += belongs). Constant factors are named after the sizes of the inputs and the output.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .diagnose import branch_message, classic, embedding_hint, size_factors
from .gradcheck import approx_equal
from .layer_oracle import Sampled, branch_grads
from .layer_report import Check


class Diagnosis:
    """The diagnosis half of ``layer.Runner`` (which provides floats, mutations, oracle,
    out_shape and full_truth)."""

    # -- diagnosis ------------------------------------------------------------------------------
    def diagnose(self, checks: list[Check]) -> dict[str, str]:
        found = {}
        for k in self.floats + (["dout"] if "dout" in self.mutations else []):
            failing = [c for c in checks if k in c.cells and c.cells[k].status != "ok"]
            if not failing:
                continue
            first = failing[0]
            text = self.explain(k, first, checks)
            applicable = [c for c in checks if k in c.cells]
            right = [c.label for c in applicable if c not in failing]
            where = "wrong in every check" if not right else \
                "wrong in: " + ", ".join(c.label for c in failing) if len(failing) <= len(right) \
                else "right only in: " + ", ".join(right)
            found[k] = f"{text} ({where})"
        return found

    def explain(self, k: str, check: Check, checks: list[Check]) -> str:
        cell = check.cells[k]
        if cell.text and cell.status == "error" or check.got is None:
            return cell.text or "wrong"
        if cell.text and cell.status == "wrong" and not cell.text.startswith("shape"):
            return f"d{k} {cell.text}" if cell.text.startswith(("is ", "has ")) else cell.text
        got = check.got[k]
        main = checks[0]
        right_in_main = k in main.cells and main.cells[k].status == "ok"
        if check.label.startswith("float32") and right_in_main:
            return (f"d{k} is right in float64 but off in float32 by {cell.maxdiff:.3g}, beyond "
                    "rounding: a float32 precision problem (an exp without the max subtracted, "
                    "a difference of large terms)")
        if right_in_main and check.label.startswith(("non-contiguous", "transposed", "expanded")):
            return (f"d{k} is right for contiguous inputs but wrong for {check.label}: the "
                    "backward depends on the memory layout (a view of the storage, as_strided, "
                    "an in-place write into a broadcast tensor)")
        if right_in_main and check.label.startswith("the same tensor"):
            return self.alias_text(k, check)
        if any(isinstance(t, Sampled) for t in check.truth.values()):
            try:
                check.truth = self.full_truth(check.values, check.dout.double())
            except Exception:
                return (f"d{k} differs from the finite differences (maxdiff {cell.maxdiff:.3g}); "
                        "the inputs are too large to diagnose by finite differences on every "
                        "entry: give a reference, or smaller shapes")
        truth = check.truth
        hint = classic(k, got, truth[k], self.alternatives(k, check), self.factors(k, check.values),
                       None) or self.embedding_text(k, got, truth[k], check.values)
        if hint:
            return hint
        raised = next((c for c in checks if k in c.cells and c.cells[k].status == "error"), None)
        if raised is not None:  # the same mistake, at other sizes, raised: its message says more
            return (f"d{k} differs from the oracle's (maxdiff {cell.maxdiff:.3g}), and in "
                    f"'{raised.label}' {raised.cells[k].text}")
        return (f"d{k} differs from the oracle's (maxdiff {cell.maxdiff:.3g}); no classic "
                "mistake recognised: recheck the local derivative and the chain rule")

    def alias_text(self, k: str, check: Check) -> str:
        a, b = [n for n in self.floats if check.values[n] is check.values[k]][:2]
        text = (f"d{k} is right for two equal copies but wrong when the same tensor is passed as "
                f"{a} and {b}: the backward writes into an input or a gradient in place, or "
                "tells its inputs apart by identity")
        ga, gb = check.got.get(a), check.got.get(b)
        if isinstance(ga, Tensor) and isinstance(gb, Tensor) and ga.shape == gb.shape:
            total = (ga + gb).detach().double()
            for part in (a, b):
                if approx_equal(total, check.truth[part]):
                    text += (f"; d{a} + d{b} is only {part}'s part: one use's gradient overwrote "
                             "the other's (= where += belongs)")
        return text

    def alternatives(self, k: str, check: Check) -> list[tuple[Tensor, str]]:
        values, dout, truth = check.values, check.dout.double(), check.truth
        alts = [(-truth[k], f"d{k} is the right answer times -1: the sign is flipped")]
        try:
            ones = self.full_truth(values, torch.ones_like(dout))
            alts.append((ones[k], f"d{k} ignores the upstream gradient: it is the gradient for an "
                                  "all-ones dout (as if the loss were out.sum()); multiply by "
                                  "dout, the chain rule"))
        except Exception:
            pass
        shape = tuple(values[k].shape)
        for j in self.floats:
            if j != k and tuple(values[j].shape) == shape:
                alts.append((truth[j], f"d{k} is {j}'s gradient: the gradients of {k} and {j} "
                                       f"are swapped (return them in the order of the inputs: "
                                       f"{', '.join(self.floats)})"))
        for j in self.floats:
            x = values[j]
            if x.ndim >= 2 and x.shape[-1] == x.shape[-2] and x.shape[-1] > 1:
                swapped = dict(values)
                swapped[j] = x.transpose(-2, -1).contiguous()
                try:
                    alts.append((self.full_truth(swapped, dout)[k],
                                 f"d{k} uses {j} where {j}.T belongs (the last two dims of {j} "
                                 "are swapped): a missing transpose. A matmul backward is a "
                                 "matmul with a transpose: for out = x @ W, dx = dout @ W.T "
                                 "and dW = x.T @ dout"))
                except Exception:
                    pass
        if dout.ndim >= 2 and dout.shape[-1] == dout.shape[-2]:
            try:
                alts.append((self.full_truth(values, dout.transpose(-2, -1).contiguous())[k],
                             f"d{k} uses dout where dout.T belongs: a missing transpose"))
            except Exception:
                pass
        if self.oracle is not None:
            uses = branch_grads(self.oracle, values, dout, k)
            for mask in range(1, 2 ** len(uses) - 1):
                kept = [u for i, u in enumerate(uses) if mask >> i & 1]
                lost = [u for i, u in enumerate(uses) if not mask >> i & 1]
                alts.append((sum(g for _, g in kept),
                             branch_message(k, f"its use in {' and '.join(n for n, _ in kept)}",
                                            " and ".join(n for n, _ in lost))))
        return alts

    def factors(self, k: str, values: dict[str, Any]) -> list[tuple[float, str]]:
        sizes = []
        for k, v in values.items():
            if isinstance(v, Tensor):
                sizes += [(s, f"dim {d} of {k}") for d, s in enumerate(v.shape)]
        sizes += [(s, f"dim {d} of the output") for d, s in enumerate(self.out_shape)]
        return size_factors(k, sizes)

    def embedding_text(self, k: str, got: Tensor, ref: Tensor, values) -> str | None:
        for j, v in values.items():
            if isinstance(v, Tensor) and not v.is_floating_point() and not v.is_complex() \
                    and v.numel() and ref.ndim >= 1 and 0 <= int(v.min()) and \
                    int(v.max()) < ref.shape[0]:
                hint = embedding_hint(got.detach().double(), ref, v, table=k, looked_up=j)
                if hint:
                    return hint
        return None
