"""What ``check-layer`` accepts, made one shape: a ``Layer`` with a forward, the user's backward
and, where autograd can follow it, a differentiable forward.

Three kinds of layer:

- a ``torch.autograd.Function`` subclass: its ``forward(ctx, *inputs)`` (or ``forward(*inputs)``
  with ``setup_context``) and ``backward(ctx, dout)``. The backward is called directly on a
  stand-in ctx, so its gradients are judged as returned (autograd would silently sum a
  gradient of a broadcast shape down to the input's and cast its dtype);
- a CS231n-style pair: ``forward(*inputs) -> (out, cache)``, ``backward(dout, cache) -> grads``;
- a function with its backward: ``f(*inputs) -> out``, ``f_backward(dout, *inputs) -> grads``.

The grads: one per input in the forward's order (a tuple or list; a lone tensor for one input;
or a dict by input name), None for inputs without a gradient. A tuple with one entry per
floating-point tensor input is accepted too (CS231n's ``batchnorm_backward`` returns dx, dgamma,
dbeta for x, gamma, beta, bn_param).
"""

from __future__ import annotations

import importlib.util
import inspect
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor

from ..errors import UserError

KINDS = {"function": "torch.autograd.Function", "pair": "forward/backward pair (cache)",
         "f": "function and its backward"}


@dataclass
class Layer:
    name: str
    kind: str
    params: list[str] | None                        # the forward's parameter names, if known
    run_forward: Callable[[tuple], Any]             # inputs -> (out, state for run_backward)
    run_backward: Callable[[Tensor, tuple, Any], Any]   # (dout, inputs, state) -> raw grads

    def forward(self, *inputs) -> Tensor:
        with torch.no_grad():
            return output_tensor(self.run_forward(inputs)[0], self.name)

    def differentiable(self, *inputs) -> Tensor:
        """The forward under autograd (the oracle when no reference is given)."""
        with torch.enable_grad():
            return output_tensor(self.run_forward(inputs)[0], self.name)

    def backward(self, dout: Tensor, inputs: tuple) -> Any:
        with torch.no_grad():
            _, state = self.run_forward(inputs)
            return self.run_backward(dout, inputs, state)


def output_tensor(out: Any, name: str) -> Tensor:
    if not isinstance(out, Tensor):
        raise LayerError(f"{name}'s forward returned a {type(out).__name__}; check-layer checks "
                         "layers with one output tensor")
    return out


class LayerError(UserError):
    """The layer or its inputs cannot be checked at all (exit code 2)."""


class StandInCtx:
    """What an autograd.Function's forward and backward use of ctx, outside autograd."""

    def __init__(self, inputs: tuple):
        self.saved_tensors: tuple = ()
        self.needs_input_grad = tuple(isinstance(x, Tensor) and x.is_floating_point()
                                      for x in inputs)
        self.materialize_grads = True

    def save_for_backward(self, *tensors):
        self.saved_tensors = tensors

    def mark_dirty(self, *tensors):
        pass

    def mark_non_differentiable(self, *tensors):
        pass

    def set_materialize_grads(self, value: bool):
        self.materialize_grads = value


def is_function(obj: object) -> bool:
    return inspect.isclass(obj) and issubclass(obj, torch.autograd.Function) \
        and obj is not torch.autograd.Function


def from_function(fn: type) -> Layer:
    separate = fn.setup_context is not torch.autograd.Function.setup_context

    def run_forward(inputs: tuple):
        ctx = StandInCtx(inputs)
        if separate:
            out = fn.forward(*inputs)
            fn.setup_context(ctx, inputs, out)
        else:
            out = fn.forward(ctx, *inputs)
        return out, ctx

    def run_backward(dout, inputs, ctx):
        return fn.backward(ctx, dout)

    params = parameter_names(fn.forward, skip=0 if separate else 1)
    return Layer(fn.__name__, KINDS["function"], params, run_forward, run_backward)


def from_pair(forward: Callable, backward: Callable, name: str | None = None) -> Layer:
    def run_forward(inputs: tuple):
        result = forward(*inputs)
        if not (isinstance(result, tuple) and len(result) == 2):
            raise LayerError(f"{forward.__name__} must return (out, cache) as a "
                             f"forward/backward pair; it returned a {type(result).__name__}")
        return result

    def run_backward(dout, inputs, cache):
        return backward(dout, cache)

    return Layer(name or forward.__name__, KINDS["pair"], parameter_names(forward),
                 run_forward, run_backward)


def from_f(f: Callable, f_backward: Callable, name: str | None = None) -> Layer:
    def run_forward(inputs: tuple):
        return f(*inputs), None

    def run_backward(dout, inputs, _):
        return f_backward(dout, *inputs)

    return Layer(name or getattr(f, "__name__", "f"), KINDS["f"], parameter_names(f),
                 run_forward, run_backward)


def adapt(fn: Any, backward: Callable | None = None) -> Layer:
    """An autograd.Function subclass; a (forward, backward) pair; or f with backward=f_backward."""
    if isinstance(fn, Layer):
        return fn
    if is_function(fn):
        return from_function(fn)
    if isinstance(fn, tuple) and len(fn) == 2 and all(callable(g) for g in fn):
        return from_pair(*fn)
    if callable(fn) and callable(backward):
        return from_f(fn, backward)
    raise LayerError("check_layer takes a torch.autograd.Function subclass, a (forward, "
                     "backward) pair whose forward returns (out, cache), or a function with "
                     "backward=its_backward(dout, *inputs)")


def parameter_names(fn: Callable, skip: int = 0) -> list[str] | None:
    try:
        params = list(inspect.signature(fn).parameters.values())[skip:]
    except (TypeError, ValueError):
        return None
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
        return None
    return [p.name for p in params]


def order_inputs(layer: Layer, inputs: Mapping[str, Any] | Sequence) -> dict[str, Any]:
    """Name the inputs: a dict is passed positionally in the forward's parameter order when its
    keys are the forward's parameters, in its own order otherwise; a sequence is named after the
    forward's parameters (x0, x1, ... when they are unknown)."""
    if isinstance(inputs, Mapping):
        params = layer.params
        if params and set(inputs) <= set(params):
            missing = [p for p in params[:len(inputs)] if p not in inputs]
            if missing:
                raise LayerError(f"no input given for {layer.name}'s parameter "
                                 f"'{missing[0]}'")
            return {p: inputs[p] for p in params if p in inputs}
        return dict(inputs)
    inputs = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
    params = layer.params or []
    return {(params[i] if i < len(params) else f"x{i}"): x for i, x in enumerate(inputs)}


def gradient_list(raw: Any, names: list[str], inputs: dict[str, Any]) -> list:
    """The user's grads as one entry per input (None where none was returned)."""
    if isinstance(raw, Mapping):
        return [raw.get(k, raw.get(f"d{k}")) for k in names]
    if isinstance(raw, Tensor) or raw is None:
        raw = (raw,)
    if not isinstance(raw, (tuple, list)):
        raise GradientCountError(f"the backward returned a {type(raw).__name__}; it must "
                                 "return one gradient per input (a tuple)")
    if len(raw) == len(names):
        return list(raw)
    floats = [k for k in names if is_float_tensor(inputs[k])]
    if len(raw) == len(floats):
        by_name = dict(zip(floats, raw))
        return [by_name.get(k) for k in names]
    raise GradientCountError(f"the backward returned {len(raw)} values for {len(names)} inputs "
                             f"({', '.join(names)}); it must return one per input, in order")


class GradientCountError(Exception):
    """The backward's result cannot be lined up with the inputs (a finding, not a setup error)."""


def is_float_tensor(x: object) -> bool:
    return isinstance(x, Tensor) and x.is_floating_point()


# ---------------------------------------------------------------------------------------------
# the command line's side: a layer from a file, inputs from a shapes spec

def load_layer(spec: str, reference: str | None = None) -> tuple[Layer, Callable | None]:
    """``FILE.py[:NAME]`` -> the layer, and the reference function named by ``reference``.

    NAME may be an autograd.Function subclass; a forward whose backward is NAME_backward
    (f and f_backward), or NAME_forward / NAME_backward or X_forward / X_backward (a pair,
    told apart from f by returning (out, cache)); without NAME, the file's only such layer."""
    match = re.match(r"^(.*\.py):(\w+)$", spec)
    path, name = (match.group(1), match.group(2)) if match else (spec, "")
    module = import_file(Path(path))
    candidates = layer_names(module)
    if not name:
        if len(candidates) != 1:
            found = ", ".join(candidates) if candidates else "none"
            raise LayerError(f"{path}: name the layer as {path}:NAME (layers found: {found})")
        name = candidates[0]
    layer = layer_by_name(module, name, path, candidates)
    ref = None
    if reference:
        ref = getattr(module, reference, None)
        if not callable(ref):
            raise LayerError(f"{path} has no function '{reference}' (for --reference)")
    return layer, ref


def import_file(path: Path):
    if not path.is_file():
        raise LayerError(f"no such file: {path}")
    mod_name = f"_check_layer_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(mod_name, path)
    if spec is None or spec.loader is None:
        raise LayerError(f"{path} is not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # the user's file: any error is a one-line message
        line = error_line(e, path)
        raise LayerError(f"{path}{line} raised {type(e).__name__}: {e}") from None
    return module


def error_line(e: BaseException, path: Path) -> str:
    if isinstance(e, SyntaxError) and e.lineno:
        return f", line {e.lineno},"
    tb = e.__traceback__
    line = None
    while tb is not None:
        if Path(tb.tb_frame.f_code.co_filename).resolve() == path.resolve():
            line = tb.tb_lineno
        tb = tb.tb_next
    return f", line {line}," if line else ""


def layer_names(module) -> list[str]:
    found = []
    for key, obj in vars(module).items():
        if getattr(obj, "__module__", None) != module.__name__:
            continue
        if is_function(obj):
            found.append(key)
        elif callable(obj) and not key.endswith("_backward") and \
                callable(getattr(module, backward_name(key), None)):
            found.append(key)
    return found


def backward_name(name: str) -> str:
    stem = name[:-len("_forward")] if name.endswith("_forward") else name
    return stem + "_backward"


def layer_by_name(module, name: str, path: str, candidates: list[str]) -> Layer:
    obj = getattr(module, name, None)
    if obj is None and callable(getattr(module, name + "_forward", None)):
        name, obj = name + "_forward", getattr(module, name + "_forward")
    if obj is None:
        found = ", ".join(candidates) or "none"
        raise LayerError(f"{path} has no '{name}' (layers found: {found})")
    if is_function(obj):
        return from_function(obj)
    bwd = getattr(module, backward_name(name), None)
    if not callable(obj) or not callable(bwd):
        raise LayerError(f"'{name}' in {path} is neither a torch.autograd.Function subclass nor "
                         f"a function with a {backward_name(name)}")
    return AutoLayer(name, obj, bwd).layer()


@dataclass
class AutoLayer:
    """A file's NAME with NAME_backward: a pair when its forward returns (out, cache)."""
    name: str
    forward: Callable
    backward: Callable

    def layer(self) -> Layer:
        def run_forward(inputs):
            result = self.forward(*inputs)
            if isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], Tensor):
                layer.kind = KINDS["pair"]
                return result[0], ("pair", result[1])
            layer.kind = KINDS["f"]
            return result, ("f", None)

        def run_backward(dout, inputs, state):
            kind, cache = state
            return self.backward(dout, cache) if kind == "pair" else self.backward(dout, *inputs)

        layer = Layer(self.name, f"{KINDS['pair']} or {KINDS['f']}",
                      parameter_names(self.forward), run_forward, run_backward)
        return layer


SHAPE_ITEM = re.compile(r"^\s*([A-Za-z_]\w*)\s*=\s*(scalar|\d+(?:x\d+)*)\s*"
                        r"(?::\s*(int<\d+|pos))?\s*$")


def parse_shapes(text: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """``"x=32x64,w=64x128,b=128,idx=32x8:int<27,v=32:pos,s=scalar"`` -> name: (shape, kind);
    kind is "normal" (standard normal floats), "pos" (uniform in [0.5, 2)) or "int<K"."""
    out: dict[str, tuple[tuple[int, ...], str]] = {}
    for item in text.split(","):
        if not item.strip():
            continue
        m = SHAPE_ITEM.match(item)
        if not m:
            raise LayerError(f"--shapes: cannot read '{item.strip()}': write NAME=AxBxC, "
                             "with :int<K for integers in [0, K) or :pos for positive floats "
                             "(e.g. x=32x64,idx=32:int<27)")
        name, dims, kind = m.group(1), m.group(2), m.group(3) or "normal"
        shape = () if dims == "scalar" else tuple(int(d) for d in dims.split("x"))
        if any(d == 0 for d in shape):
            raise LayerError(f"--shapes: {name} has a dimension of size 0")
        if kind.startswith("int<") and int(kind[4:]) < 1:
            raise LayerError(f"--shapes: {name}: int<K needs K >= 1")
        if name in out:
            raise LayerError(f"--shapes: {name} is given twice")
        out[name] = (shape, kind)
    if not out:
        raise LayerError("--shapes is empty: give every input, e.g. --shapes x=32x64,w=64x128")
    return out


def make_inputs(shapes: Mapping[str, tuple[tuple[int, ...], str]], seed: int = 0,
                device: str = "cpu") -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, (shape, kind) in shapes.items():
        if kind.startswith("int<"):
            x = torch.randint(0, int(kind[4:]), shape, generator=g)
        elif kind == "pos":
            x = torch.rand(shape, generator=g) * 1.5 + 0.5
        else:
            x = torch.randn(shape, generator=g)
        try:
            out[name] = x.to(device)
        except (RuntimeError, AssertionError) as e:
            raise LayerError(f"--device {device}: {str(e).splitlines()[0]}") from None
    return out
