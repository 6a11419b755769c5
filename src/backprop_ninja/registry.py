"""The registry of layers and how to check each one.

Every layer pair in ``layers`` has an entry here: how to make test inputs (non-zero biases,
gain != 1, seeded), an independent reference forward built from ``torch.nn.functional`` or plain
formulas (autograd differentiates that one, not ours), and the names of the inputs whose gradients
its backward returns. ``check_layer`` runs both oracles on one entry; the tests run it over all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from . import layers as L
from .gradcheck import autograd_grads, finite_difference_grads, relative_error

InputMaker = Callable[[torch.Generator, int, int, torch.dtype], dict[str, Tensor]]


@dataclass(frozen=True)
class LayerSpec:
    name: str
    forward: Callable[..., tuple[Tensor, object]]
    backward: Callable[[Tensor, object], tuple[Tensor, ...]]
    reference: Callable[..., Tensor]
    make_inputs: InputMaker     # (generator, batch n, width, dtype) -> named inputs
    grad_inputs: tuple[str, ...]  # the inputs whose gradients backward returns, in its order


def _randn(g: torch.Generator, *shape: int, dtype: torch.dtype, scale: float = 1.0,
           shift: float = 0.0) -> Tensor:
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale + shift).to(dtype)


def _embedding_inputs(g, n, width, dtype):
    # width plays the vocabulary size; n_embd 5, block 3; every row of C is likely reused
    return {"C": _randn(g, width, 5, dtype=dtype),
            "ix": torch.randint(0, width, (n, 3), generator=g)}


def _linear_inputs(g, n, width, dtype):
    return {"x": _randn(g, n, 6, dtype=dtype), "w": _randn(g, 6, width, dtype=dtype, scale=0.5),
            "b": _randn(g, width, dtype=dtype, scale=0.1)}


def _tanh_inputs(g, n, width, dtype):
    return {"x": _randn(g, n, width, dtype=dtype, scale=1.5)}


def _batchnorm_inputs(g, n, width, dtype):
    return {"x": _randn(g, n, width, dtype=dtype, scale=2.0, shift=0.5),
            "gain": _randn(g, 1, width, dtype=dtype, scale=0.1, shift=1.0),
            "bias": _randn(g, 1, width, dtype=dtype, scale=0.1)}


def _cross_entropy_inputs(g, n, width, dtype):
    return {"logits": _randn(g, n, width, dtype=dtype, scale=2.0),
            "targets": torch.randint(0, width, (n,), generator=g)}


def _batchnorm_reference(x, gain, bias):
    # written from the definition, with torch.var's own Bessel correction
    mean = x.mean(0, keepdim=True)
    var = x.var(0, keepdim=True, unbiased=True)
    return gain * (x - mean) / torch.sqrt(var + L.BN_EPS) + bias


REGISTRY: dict[str, LayerSpec] = {spec.name: spec for spec in (
    LayerSpec("embedding", L.embedding_forward, L.embedding_backward,
              lambda C, ix: F.embedding(ix, C), _embedding_inputs, ("C",)),
    LayerSpec("linear", L.linear_forward, L.linear_backward,
              lambda x, w, b: F.linear(x, w.T, b), _linear_inputs, ("x", "w", "b")),
    LayerSpec("tanh", L.tanh_forward, L.tanh_backward,
              lambda x: torch.tanh(x), _tanh_inputs, ("x",)),
    LayerSpec("batchnorm", L.batchnorm_forward, L.batchnorm_backward,
              _batchnorm_reference, _batchnorm_inputs, ("x", "gain", "bias")),
    LayerSpec("cross_entropy", L.cross_entropy_forward, L.cross_entropy_backward,
              lambda logits, targets: F.cross_entropy(logits, targets), _cross_entropy_inputs,
              ("logits",)),
)}


@dataclass
class LayerCheck:
    """Everything one check of one layer produced, for asserting or printing."""

    out: Tensor
    reference_out: Tensor
    manual: dict[str, Tensor]     # hand-written gradients
    autograd: dict[str, Tensor]   # autograd through the reference forward
    numeric: dict[str, Tensor]    # float64 central differences of our forward

    def relative_errors(self) -> dict[str, float]:
        return {k: relative_error(self.manual[k].double(), self.numeric[k]) for k in self.manual}


def check_layer(spec: LayerSpec, seed: int, n: int, width: int,
                dtype: torch.dtype = torch.float64) -> LayerCheck:
    """Run one layer forward and backward with a random upstream gradient, against both oracles."""
    g = torch.Generator().manual_seed(seed)
    inputs = spec.make_inputs(g, n, width, dtype)
    out, cache = spec.forward(**inputs)
    dout = torch.randn(out.shape, generator=g, dtype=torch.float64).to(dtype)
    manual = dict(zip(spec.grad_inputs, spec.backward(dout, cache)))

    def ours(**kw):
        return spec.forward(**kw)[0]

    return LayerCheck(out, spec.reference(**inputs), manual,
                      autograd_grads(spec.reference, inputs, dout),
                      finite_difference_grads(ours, inputs, dout))
