"""The registry of layers and how to check each one.

Every layer pair in ``nn`` has at least one entry here (some have several: a 3-D batchnorm, a
linear without bias, a cross-entropy with padding): how to make test inputs (non-zero biases,
gain != 1, seeded), an independent reference forward built from ``torch.nn.functional`` or plain
formulas (autograd differentiates that one, not ours), and the names of the inputs whose
gradients its backward returns. ``check_layer`` runs both oracles on one entry with a random
upstream gradient; the tests run it over all of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ..checking.gradcheck import autograd_grads, finite_difference_grads, relative_error
from . import activations as A
from . import embedding as E
from . import linear as L
from . import losses as X
from . import normalisation as N
from . import reshape as R

InputMaker = Callable[[torch.Generator, int, int, torch.dtype], dict[str, Tensor]]


@dataclass(frozen=True)
class LayerSpec:
    name: str
    layer: str                  # the forward/backward pair checked: <layer>_forward, <layer>_backward
    forward: Callable[..., tuple[Tensor, object]]
    backward: Callable[[Tensor, object], tuple[Tensor, ...]]
    reference: Callable[..., Tensor]
    make_inputs: InputMaker     # (generator, batch n, width, dtype) -> named inputs
    grad_inputs: tuple[str, ...]  # the inputs whose gradients backward returns, in its order


def _randn(g: torch.Generator, *shape: int, dtype: torch.dtype, scale: float = 1.0,
           shift: float = 0.0) -> Tensor:
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale + shift).to(dtype)


def _embedding_inputs(g, n, width, dtype):
    # width plays the vocabulary size; n_embd 5, block 3; every row is likely reused
    return {"table": _randn(g, width, 5, dtype=dtype),
            "ix": torch.randint(0, width, (n, 3), generator=g)}


def _linear_inputs(g, n, width, dtype):
    return {"x": _randn(g, n, 6, dtype=dtype), "w": _randn(g, 6, width, dtype=dtype, scale=0.5),
            "b": _randn(g, width, dtype=dtype, scale=0.1)}


def _linear_3d_inputs(g, n, width, dtype):
    return {"x": _randn(g, n, 4, 6, dtype=dtype), "w": _randn(g, 6, width, dtype=dtype, scale=0.5)}


def _pointwise_inputs(g, n, width, dtype):
    return {"x": _randn(g, n, width, dtype=dtype, scale=1.5)}


def _batchnorm_inputs(g, n, width, dtype):
    return {"x": _randn(g, n, width, dtype=dtype, scale=2.0, shift=0.5),
            "gain": _randn(g, 1, width, dtype=dtype, scale=0.1, shift=1.0),
            "bias": _randn(g, 1, width, dtype=dtype, scale=0.1)}


def _batchnorm_3d_inputs(g, n, width, dtype):
    return {"x": _randn(g, n, 4, width, dtype=dtype, scale=2.0, shift=0.5),
            "gain": _randn(g, 1, 1, width, dtype=dtype, scale=0.1, shift=1.0),
            "bias": _randn(g, 1, 1, width, dtype=dtype, scale=0.1)}


def _cross_entropy_inputs(g, n, width, dtype):
    return {"logits": _randn(g, n, width, dtype=dtype, scale=2.0),
            "targets": torch.randint(0, width, (n,), generator=g)}


def _padded_cross_entropy_inputs(g, n, width, dtype):
    # n sequences of 5 positions, the last ones padded as makemore pads (and never all of them)
    targets = torch.randint(0, width, (n, 5), generator=g)
    lengths = torch.randint(1, 6, (n,), generator=g)
    targets[torch.arange(5).view(1, 5) >= lengths.view(n, 1)] = X.IGNORE_INDEX
    return {"logits": _randn(g, n, 5, width, dtype=dtype, scale=2.0), "targets": targets}


def _flatten_inputs(g, n, width, dtype):
    return {"x": _randn(g, n, 8, width, dtype=dtype)}


# --- part 2, normalisation and attention: input makers and references (above this line) ---

# --- part 2, sequence layers: input makers and references (above this line) ---


def _batchnorm_reference(x, gain, bias):
    # written from the definition, with torch.var's own Bessel correction, over all but the last dim
    dims = tuple(range(x.ndim - 1))
    mean = x.mean(dims, keepdim=True)
    var = x.var(dims, keepdim=True, unbiased=True)
    return gain * (x - mean) / torch.sqrt(var + N.BN_EPS) + bias


def _padded_cross_entropy_reference(logits, targets):
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=X.IGNORE_INDEX)


def _flatten_reference(x):
    # concatenating positions 2t and 2t+1, written with indexing rather than a reshape
    return torch.cat([x[:, 0::2], x[:, 1::2]], dim=2)


REGISTRY: dict[str, LayerSpec] = {spec.name: spec for spec in (
    LayerSpec("embedding", "embedding", E.embedding_forward, E.embedding_backward,
              lambda table, ix: F.embedding(ix, table), _embedding_inputs, ("table",)),
    LayerSpec("linear", "linear", L.linear_forward, L.linear_backward,
              lambda x, w, b: F.linear(x, w.T, b), _linear_inputs, ("x", "w", "b")),
    LayerSpec("linear_nobias_3d", "linear", L.linear_forward, L.linear_backward,
              lambda x, w: F.linear(x, w.T), _linear_3d_inputs, ("x", "w")),
    LayerSpec("tanh", "tanh", A.tanh_forward, A.tanh_backward,
              lambda x: torch.tanh(x), _pointwise_inputs, ("x",)),
    LayerSpec("relu", "relu", A.relu_forward, A.relu_backward,
              lambda x: F.relu(x), _pointwise_inputs, ("x",)),
    LayerSpec("gelu", "gelu", A.gelu_forward, A.gelu_backward,
              lambda x: F.gelu(x, approximate="tanh"), _pointwise_inputs, ("x",)),
    LayerSpec("batchnorm", "batchnorm", N.batchnorm_forward, N.batchnorm_backward,
              _batchnorm_reference, _batchnorm_inputs, ("x", "gain", "bias")),
    LayerSpec("batchnorm_3d", "batchnorm", N.batchnorm_forward, N.batchnorm_backward,
              _batchnorm_reference, _batchnorm_3d_inputs, ("x", "gain", "bias")),
    LayerSpec("cross_entropy", "cross_entropy", X.cross_entropy_forward, X.cross_entropy_backward,
              lambda logits, targets: F.cross_entropy(logits, targets), _cross_entropy_inputs,
              ("logits",)),
    LayerSpec("cross_entropy_padded", "cross_entropy",
              lambda logits, targets: X.cross_entropy_forward(logits, targets, X.IGNORE_INDEX),
              X.cross_entropy_backward, _padded_cross_entropy_reference,
              _padded_cross_entropy_inputs, ("logits",)),
    LayerSpec("flatten_consecutive", "flatten_consecutive",
              lambda x: R.flatten_consecutive_forward(x, 2), R.flatten_consecutive_backward,
              _flatten_reference, _flatten_inputs, ("x",)),
    # --- part 2, normalisation and attention: entries (above this line) ---
    # --- part 2, sequence layers: entries (above this line) ---
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
