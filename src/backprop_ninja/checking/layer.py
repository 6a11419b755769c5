"""``check_layer``: a gradient check for anyone's hand-written backward that says what is wrong.

It runs the user's backward at several points and compares every gradient with an oracle
(``layer_oracle``: autograd of a reference or of the forward itself, float64 finite differences),
with the project's one "approximately equal" (``gradcheck.approx_equal``):

- float64 and float32 at the given sizes with a random upstream gradient, and float64 with a
  second random one; finite differences at the smallest batch;
- batch sizes 1, 2 and 5: dim 0 of the batch inputs (``batch``; by default every tensor input
  whose dim 0 has the size of the first input's dim 0) taken as rows 0, 1, ... of the given ones;
- non-contiguous (every other entry of a wider tensor), transposed (stored column-major) and
  expanded (dim 0 broadcast from its first row, stride 0) inputs;
- the same tensor passed as two inputs of the same shape;
- that no call changes the inputs or dout, and that two calls give equal gradients.

Each wrong input is then diagnosed in words (``report_text``), with the classic mistakes of
``diagnose`` and the alternatives recomputed here (upstream ignored, gradients swapped, a
transpose missing, a branch overwritten).
"""

from __future__ import annotations

import traceback
import warnings
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor

from .diagnose import exception_hint
from .gradcheck import approx_equal, gradient_problem
from .layer_adapt import (GradientCountError, Layer, LayerError, adapt, gradient_list,
                          is_float_tensor, order_inputs)
from .layer_oracle import FD_SAMPLE, Sampled, as_float64, autograd_truth, finite_differences
from .layer_diagnosis import Diagnosis
from .layer_report import Cell, Check, Report

BATCHES = (1, 2, 5)
DIAGNOSIS_FD_LIMIT = 4096


class Runner(Diagnosis):
    def __init__(self, layer: Layer, named: dict[str, Any], reference: Callable | None,
                 batch: Sequence[str] | None, seed: int, fd_sample: int):
        self.layer, self.named, self.fd_sample = layer, named, fd_sample
        self.names = list(named)
        self.floats = [k for k in self.names if is_float_tensor(named[k])]
        if not self.floats:
            raise LayerError("no floating-point tensor among the inputs: nothing has a gradient")
        self.g = torch.Generator().manual_seed(seed)
        self.mutations: dict[str, str] = {}
        self.notes: list[str] = []
        self.base64 = self.cast(named, torch.float64)
        self.batch: list[str] = []
        try:
            out = layer.forward(*self.base64.values())
        except LayerError:
            raise
        except Exception as e:
            raise LayerError(f"{layer.name}'s forward raised on the inputs: "
                             f"{type(e).__name__}: {e}") from None
        self.out_shape = tuple(out.shape)
        self.batch = self.batch_inputs(batch)
        self.dout1 = self.randn(out)
        self.dout2 = self.randn(out)
        self.oracle, self.oracle_label = self.pick_oracle(reference, out)

    # -- inputs -------------------------------------------------------------------------------
    def batch_inputs(self, batch: Sequence[str] | None) -> list[str]:
        tensors = [k for k in self.names if isinstance(self.named[k], Tensor)]
        if batch is not None:
            unknown = [k for k in batch if k not in tensors]
            if unknown:
                raise LayerError(f"batch: '{unknown[0]}' is not a tensor input "
                                 f"({', '.join(tensors)})")
            return list(batch)
        first = self.named[tensors[0]] if tensors else None
        if first is None or first.ndim == 0:
            return []
        n = first.shape[0]
        sharing = [k for k in tensors if self.named[k].ndim > 0 and self.named[k].shape[0] == n]
        # every input sharing the first's dim 0, or the first alone (a square weight may share it)
        for candidate in (sharing, tensors[:1]):
            self.batch = candidate
            try:
                self.layer.forward(*self.at_batch(2).values())
                return candidate
            except Exception:
                continue
        return []

    def cast(self, values: Mapping[str, Any], dtype) -> dict[str, Any]:
        return {k: (v.detach().to(dtype).clone() if is_float_tensor(v) else v)
                for k, v in values.items()}

    def randn(self, like: Tensor) -> Tensor:
        return torch.randn(like.shape, generator=self.g, dtype=torch.float64).to(like.device)

    def at_batch(self, b: int) -> dict[str, Any]:
        out = dict(self.base64)
        for k in self.batch:
            x = out[k]
            out[k] = x[torch.arange(b, device=x.device) % x.shape[0]].clone()
        return out

    # -- oracles ------------------------------------------------------------------------------
    def pick_oracle(self, reference: Callable | None, out: Tensor):
        if reference is not None:
            try:
                ref_out = reference(*self.cast(self.base64, torch.float64).values())
            except Exception as e:
                raise LayerError(f"the reference raised on the inputs: {type(e).__name__}: {e}") \
                    from None
            if not isinstance(ref_out, Tensor) or not approx_equal(ref_out, out):
                raise LayerError(f"the reference's output differs from {self.layer.name}'s "
                                 "forward on the same float64 inputs: a reference must compute "
                                 "the same function")
            return reference, f"autograd of the reference {getattr(reference, '__name__', '')}"
        try:
            probe = self.fd_point()
            leaves = {k: (v.requires_grad_(True) if k in self.floats else v)
                      for k, v in as_float64(probe).items()}
            if not self.layer.differentiable(*leaves.values()).requires_grad:
                return None, "finite differences only (autograd cannot follow the forward)"
            truth = autograd_truth(self.layer.differentiable, probe, self.dout_for(probe, 1),
                                   self.floats)
            fd = finite_differences(self.layer.forward, probe, self.dout_for(probe, 1),
                                    self.floats, self.g, self.fd_sample)
        except Exception:
            return None, "finite differences only (autograd cannot follow the forward)"
        if all(sampled_equal(truth[k], fd[k]) for k in self.floats):
            return self.layer.differentiable, \
                "autograd of the forward itself (it agrees with finite differences)"
        self.notes.append("autograd of the forward disagrees with finite differences (it "
                          "leaves autograd somewhere: detach, no_grad, .data, in-place "
                          "writes), so finite differences are the only oracle")
        return None, "finite differences only (autograd of the forward disagrees with them)"

    def fd_point(self) -> dict[str, Any]:
        return self.at_batch(2) if self.batch else dict(self.base64)

    def dout_for(self, values: dict[str, Any], which: int) -> Tensor:
        """dout for these inputs: the check's own random one, cut or tiled to the batch."""
        base = self.dout1 if which == 1 else self.dout2
        if values is self.base64 or not self.batch:
            return base
        out = self.layer.forward(*values.values())
        if out.shape == base.shape:
            return base
        if out.ndim == base.ndim and out.shape[1:] == base.shape[1:]:
            return base[torch.arange(out.shape[0], device=base.device) % base.shape[0]].clone()
        g = torch.Generator().manual_seed(int(out.numel()) * 7 + which)
        return torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.device)

    def truth(self, values: dict[str, Any], dout: Tensor, fd: bool = False) -> dict[str, Any]:
        if self.oracle is not None and not fd:
            return autograd_truth(self.oracle, values, dout, self.floats)
        return finite_differences(self.layer.forward, values, dout, self.floats, self.g,
                                  self.fd_sample)

    def full_truth(self, values: dict[str, Any], dout: Tensor) -> dict[str, Tensor]:
        """Every entry of the oracle's gradients: autograd, or finite differences on every
        entry when the inputs are small enough (``DIAGNOSIS_FD_LIMIT`` entries); else raises."""
        if self.oracle is not None:
            return autograd_truth(self.oracle, values, dout, self.floats)
        if sum(values[k].numel() for k in self.floats) > DIAGNOSIS_FD_LIMIT:
            raise ValueError("too large for finite differences on every entry")
        fd = finite_differences(self.layer.forward, values, dout, self.floats, self.g,
                                every_entry=True)
        return {k: fd[k].values.reshape(values[k].shape) for k in self.floats}

    # -- the user's backward ----------------------------------------------------------------
    def user_grads(self, values: dict[str, Any], dout: Tensor) -> list:
        before = {k: v.clone() for k, v in values.items() if isinstance(v, Tensor)}
        dout_before = dout.clone()
        args = tuple(values.values())
        with torch.no_grad():
            _, state = self.layer.run_forward(args)
            self.note_mutations(values, before, dout, dout_before, "forward")
            raw = self.layer.run_backward(dout, args, state)
        self.note_mutations(values, before, dout, dout_before, "backward")
        return gradient_list(raw, self.names, values)

    def note_mutations(self, values, before, dout, dout_before, where: str) -> None:
        for k, old in before.items():
            if k not in self.mutations and not same(values[k], old):
                self.mutations[k] = f"the {where} changed {k} in place"
                values[k].copy_(old)
        if "dout" not in self.mutations and not same(dout, dout_before):
            self.mutations["dout"] = f"the {where} changed dout in place"
            dout.copy_(dout_before)

    # -- one check ------------------------------------------------------------------------------
    def check(self, label: str, values: dict[str, Any], dout: Tensor, dtype=torch.float64,
              fd: bool = False, skip_on_forward_error: bool = False,
              as_given: bool = False) -> Check:
        values = values if as_given else self.cast(values, dtype)  # as_given: layouts, aliases
        dout = dout.to(dtype)
        try:
            out = self.layer.forward(*values.values())
        except Exception as e:
            if skip_on_forward_error:
                return Check(label, {}, skipped=f"the forward raised: {one_line(e)}")
            return self.all_cells(label, "error", f"the forward raised: {one_line(e)}")
        if not torch.isfinite(out).all():
            return Check(label, {}, skipped="the forward's output is not finite here")
        try:
            truth = self.truth(values, dout.double(), fd=fd)
        except Exception as e:
            return Check(label, {}, skipped=f"the oracle raised: {one_line(e)}")
        try:
            got = self.user_grads(values, dout)
        except GradientCountError as e:
            return self.all_cells(label, "error", str(e))
        except Exception as e:
            return self.all_cells(label, "error", self.describe_exception(e))
        cells = {k: judge(k, g, values[k], truth[k])
                 for k, g in zip(self.names, got) if k in self.floats}
        return Check(label, cells, values=values, dout=dout, got=dict(zip(self.names, got)),
                     truth=truth)

    def all_cells(self, label: str, status: str, text: str) -> Check:
        return Check(label, {k: Cell(status, None, text) for k in self.floats})

    def describe_exception(self, e: BaseException) -> str:
        where = user_frame(e)
        hint = exception_hint(e)
        return f"the backward raised {type(e).__name__}{where}: {str(e).splitlines()[0]}" + \
            (f" (hint: {hint})" if hint else "")

    # -- the whole run ------------------------------------------------------------------------
    def run(self) -> Report:
        checks = [self.check("float64, random dout", self.base64, self.dout1),
                  self.check("float32, random dout", self.base64, self.dout1, torch.float32),
                  self.check("float64, a second random dout", self.base64, self.dout2)]
        fd_values = self.fd_point()
        fd_label = "finite differences" + (", batch 2" if self.batch else "")
        checks.append(self.check(fd_label, fd_values, self.dout_for(fd_values, 1), fd=True))
        given = self.named[self.batch[0]].shape[0] if self.batch else None
        for b in BATCHES:
            if self.batch and b != given:
                values = self.at_batch(b)
                try:
                    dout = self.dout_for(values, 1)
                except Exception as e:
                    checks.append(Check(f"batch {b}", {}, skipped=f"the forward raised: "
                                        f"{one_line(e)}"))
                    continue
                checks.append(self.check(f"batch {b}", values, dout,
                                         skip_on_forward_error=True))
        if not self.batch:
            self.notes.append("no batch dim found: batch sizes not varied")
        for label, make in (("non-contiguous inputs", noncontiguous), ("transposed inputs",
                            transposed), ("expanded inputs (dim 0 broadcast)", expanded)):
            values = {k: (make(v) if k in self.floats else v) for k, v in self.base64.items()}
            if any(values[k] is not self.base64[k] for k in self.floats):
                checks.append(self.check(label, values, self.dout1, as_given=True))
        pair = next(((a, b) for i, a in enumerate(self.floats) for b in self.floats[i + 1:]
                     if self.named[a].shape == self.named[b].shape), None)
        if pair:
            a, b = pair
            values = dict(self.base64)
            values[b] = values[a]
            checks.append(self.check(f"the same tensor as {a} and {b}", values, self.dout1,
                                     as_given=True))
        checks.append(self.mutation_check())
        checks.append(self.repeat_check())
        return Report(self.layer.name, self.layer.kind,
                      {k: describe_input(v) for k, v in self.named.items()}, self.out_shape,
                      [self.oracle_label, "float64 finite differences"], self.batch, checks,
                      self.diagnose(checks), self.notes, self.floats)

    def mutation_check(self) -> Check:
        cells = {k: Cell("wrong", None, self.mutations[k]) if k in self.mutations else
                 Cell("ok", None, None) for k in self.floats}
        if "dout" in self.mutations:
            cells["dout"] = Cell("wrong", None, self.mutations["dout"])
        return Check("no input or dout changed", cells)

    def repeat_check(self) -> Check:
        try:
            first = self.user_grads(dict(self.base64), self.dout1.clone())
            second = self.user_grads(dict(self.base64), self.dout1.clone())
        except Exception as e:
            return self.all_cells("two calls equal", "error", self.describe_exception(e))
        cells = {}
        for k, a, b in zip(self.names, first, second):
            if k in self.floats:
                equal = isinstance(a, Tensor) and isinstance(b, Tensor) and a.shape == b.shape \
                    and torch.equal(a, b)
                cells[k] = Cell("ok", None, None) if equal else \
                    Cell("wrong", None, "two calls on the same inputs gave different gradients")
        return Check("two calls equal", cells)

# ---------------------------------------------------------------------------------------------

def judge(name: str, got: object, x: Tensor, truth: Tensor | Sampled) -> Cell:
    """One gradient against the oracle: type, device, dtype, shape, then values."""
    problem = gradient_problem(got, x)
    if problem is not None:
        return Cell("wrong", None, problem)
    if got.dtype != x.dtype:
        return Cell("wrong", None, f"is {dtype_name(got.dtype)} for a {dtype_name(x.dtype)} "
                                   f"{name}: a gradient has its tensor's dtype")
    if tuple(got.shape) != tuple(x.shape):
        return Cell("wrong", None, f"shape {list(got.shape)}, expected {list(x.shape)}")
    g = got.detach().double()
    if isinstance(truth, Sampled):
        mine = g.reshape(-1) if truth.index is None else g.reshape(-1)[truth.index]
        ref = truth.values
    else:
        mine, ref = g, truth
    maxdiff = (mine - ref).abs().max().item() if mine.numel() else 0.0
    if not approx_equal(mine, ref):
        return Cell("wrong", maxdiff, None)
    return Cell("ok", maxdiff, None)


def sampled_equal(full: Tensor, sampled: Sampled) -> bool:
    flat = full.reshape(-1)
    mine = flat if sampled.index is None else flat[sampled.index]
    return approx_equal(mine, sampled.values)


def same(a: Tensor, b: Tensor) -> bool:
    return a.shape == b.shape and bool(torch.equal(a, b) or
                                       (a.is_floating_point() and torch.allclose(
                                           a, b, rtol=0, atol=0, equal_nan=True)))


def noncontiguous(x: Tensor) -> Tensor:
    if x.ndim == 0:
        return x
    wide = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype, device=x.device)
    view = wide[..., ::2]
    view.copy_(x)
    return view


def transposed(x: Tensor) -> Tensor:
    return x.transpose(-2, -1).contiguous().transpose(-2, -1) if x.ndim >= 2 else x


def expanded(x: Tensor) -> Tensor:
    return x[:1].expand_as(x) if x.ndim >= 1 and x.shape[0] > 1 else x


def dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def one_line(e: BaseException) -> str:
    text = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {text}"


def user_frame(e: BaseException) -> str:
    """' (file.py, line N)': the last frame of the traceback outside torch and this package."""
    frames = [f for f in traceback.extract_tb(e.__traceback__)
              if "/torch/" not in f.filename and "/backprop_ninja/checking/" not in f.filename]
    if not frames:
        return ""
    f = frames[-1]
    return f" at {f.filename.rsplit('/', 1)[-1]}, line {f.lineno}"


def describe_input(x: object) -> str:
    if isinstance(x, Tensor):
        return f"{list(x.shape)} {dtype_name(x.dtype)}"
    return type(x).__name__


def check_layer(fn: Any, inputs: Mapping[str, Any] | Sequence | Tensor,
                reference: Callable | None = None, *, backward: Callable | None = None,
                batch: Sequence[str] | None = None, seed: int = 0,
                fd_sample: int = FD_SAMPLE) -> Report:
    """Check a hand-written backward against autograd and float64 finite differences.

    ``fn``: a torch.autograd.Function subclass, a (forward, backward) pair whose forward returns
    (out, cache) and whose backward(dout, cache) returns the grads, or a function f with
    ``backward=f_backward``, f_backward(dout, *inputs) -> grads. ``inputs``: a dict by name (or a
    sequence), passed positionally. ``reference``: a differentiable function of the same
    inputs; without it, autograd of the forward itself is an oracle when autograd can follow it
    and agrees with finite differences. ``batch``: the inputs whose dim 0 is the batch.
    The returned report prints as a table; ``report.ok`` says whether every check passed."""
    layer = adapt(fn, backward)
    named = order_inputs(layer, inputs)
    with warnings.catch_warnings():  # the layer's own warnings, e.g. var() at batch 1
        warnings.simplefilter("ignore")
        return Runner(layer, named, reference, batch, seed, fd_sample).run()


def assert_backward(fn: Any, inputs: Mapping[str, Any] | Sequence | Tensor,
                    reference: Callable | None = None, **kwargs) -> Report:
    """``check_layer`` for a test suite: raises AssertionError with the report's table when any
    check fails; returns the report otherwise."""
    report = check_layer(fn, inputs, reference, **kwargs)
    if not report.ok:
        raise AssertionError("\n" + report.text())
    return report
