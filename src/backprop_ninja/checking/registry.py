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

from ..nn import (activations, attention, bow, dropout, embedding, linear, losses, normalisation,
                 recurrent, reshape, transformer)
from .gradcheck import autograd_grads, finite_difference_grads, relative_error

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
    targets[torch.arange(5).view(1, 5) >= lengths.view(n, 1)] = losses.IGNORE_INDEX
    return {"logits": _randn(g, n, 5, width, dtype=dtype, scale=2.0), "targets": targets}


SOFT_WEIGHT = 0.3  # the teacher's share of the target in the distillation entry


def _soft_cross_entropy_inputs(g, n, width, dtype):
    inputs = _padded_cross_entropy_inputs(g, n, width, dtype)
    teacher = torch.softmax(_randn(g, n, 5, width, dtype=torch.float64, scale=2.0), -1).to(dtype)
    return {**inputs, "teacher": teacher}  # a constant: only the logits' gradient is checked


def _soft_cross_entropy_reference(logits, targets, teacher):
    """(1 - alpha) times the padded cross-entropy plus alpha times the cross-entropy against
    the teacher's distribution, both averaged over the targets that count."""
    keep = (targets != losses.IGNORE_INDEX).reshape(-1)
    logprobs = F.log_softmax(logits.reshape(-1, logits.shape[-1]), -1)[keep]
    teacher = teacher.reshape(-1, logits.shape[-1])[keep]
    return ((1 - SOFT_WEIGHT) * _padded_cross_entropy_reference(logits, targets)
            - SOFT_WEIGHT * (teacher * logprobs).sum(1).mean())


def _flatten_inputs(g, n, width, dtype):
    return {"x": _randn(g, n, 8, width, dtype=dtype)}


def _layernorm_inputs(g, n, width, dtype):
    # n sequences of 5 positions, rows of `width` features; weight != 1, so that dx's
    # xhat * mean(dxhat * xhat) term does not vanish
    return {"x": _randn(g, n, 5, width, dtype=dtype, scale=2.0, shift=0.5),
            "weight": _randn(g, width, dtype=dtype, scale=0.3, shift=1.0),
            "bias": _randn(g, width, dtype=dtype, scale=0.1)}


def _attention_params(g, C, dtype):
    return {"w_qkv": _randn(g, C, 3 * C, dtype=dtype, scale=0.4),
            "b_qkv": _randn(g, 3 * C, dtype=dtype, scale=0.1),
            "w_proj": _randn(g, C, C, dtype=dtype, scale=0.4),
            "b_proj": _randn(g, C, dtype=dtype, scale=0.1)}


def _attention_inputs(C, max_T):
    """C is fixed so that the heads divide it whatever the width (3 or 27, neither even); the
    width sets T (3 at width 3, max_T at 27), keeping the finite differences small."""
    def make(g, n, width, dtype):
        return {"x": _randn(g, n, min(width, max_T), C, dtype=dtype),
                **_attention_params(g, C, dtype)}
    return make


def _block_inputs(g, n, width, dtype):
    C = 4  # 2 heads of 2; the MLP is 4 -> 16 -> 4
    ln = lambda: {"w": _randn(g, C, dtype=dtype, scale=0.3, shift=1.0),  # noqa: E731
                  "b": _randn(g, C, dtype=dtype, scale=0.1)}
    ln1, ln2 = ln(), ln()
    return {"x": _randn(g, n, min(width, 4), C, dtype=dtype), "ln1_w": ln1["w"], "ln1_b": ln1["b"],
            **_attention_params(g, C, dtype), "ln2_w": ln2["w"], "ln2_b": ln2["b"],
            "w_fc": _randn(g, C, 4 * C, dtype=dtype, scale=0.5),
            "b_fc": _randn(g, 4 * C, dtype=dtype, scale=0.1),
            "w_fc2": _randn(g, 4 * C, C, dtype=dtype, scale=0.3),
            "b_fc2": _randn(g, C, dtype=dtype, scale=0.1)}


def _attention_reference(n_head):
    # torch's own causal attention on GPT-2's q, k, v split
    def reference(x, w_qkv, b_qkv, w_proj, b_proj):
        n, T, C = x.shape
        q, k, v = F.linear(x, w_qkv.T, b_qkv).split(C, dim=2)
        heads = lambda t: t.view(n, T, n_head, C // n_head).transpose(1, 2)  # noqa: E731
        y = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), is_causal=True)
        return F.linear(y.transpose(1, 2).reshape(n, T, C), w_proj.T, b_proj)
    return reference


def _block_reference(n_head, p_drop=0.0):
    attend = _attention_reference(n_head)

    def reference(x, ln1_w, ln1_b, w_qkv, b_qkv, w_proj, b_proj, ln2_w, ln2_b,
                  w_fc, b_fc, w_fc2, b_fc2):
        # dropout's masks as the layer documents them: uniform float32 u >= p, the attention
        # branch's drawn first, from a generator seeded as the entry's forward seeds its own
        g = torch.Generator().manual_seed(DROPOUT_SEED)
        drop = lambda t: t * (torch.rand(t.shape, generator=g) >= p_drop) / (1 - p_drop)  # noqa: E731
        C = x.shape[-1]
        h = F.layer_norm(x, (C,), ln1_w, ln1_b, normalisation.LN_EPS)
        x = x + drop(attend(h, w_qkv, b_qkv, w_proj, b_proj))
        h = F.linear(F.layer_norm(x, (C,), ln2_w, ln2_b, normalisation.LN_EPS), w_fc.T, b_fc)
        return x + drop(F.linear(F.gelu(h, approximate="tanh"), w_fc2.T, b_fc2))
    return reference


DROPOUT_P, DROPOUT_SEED = 0.3, 1234


def _dropout_fixed(x):
    # a fresh generator with the same seed at every call: the same mask for the finite differences
    return dropout.dropout_forward(x, DROPOUT_P, torch.Generator().manual_seed(DROPOUT_SEED))


def _dropout_reference(x):
    # the mask drawn as the layer documents it (uniform float32 u >= p, from the same seed); the
    # scaling written apart from ours: kept values divided by 1 - p, the others zero
    g = torch.Generator().manual_seed(DROPOUT_SEED)
    u = torch.rand(x.shape, generator=g, dtype=torch.float32)
    return torch.where(u >= DROPOUT_P, x / (1 - DROPOUT_P), torch.zeros_like(x))


ATTENTION_ENTRIES = (("attention", 2, 8, 5),       # name, n_head, C, max T
                     ("attention_odd_heads", 3, 9, 4))  # hs = 3: no power of two assumed

# --- part 2, normalisation and attention: input makers and references (above this line) ---

SEQ_T, SEQ_C = 4, 3  # positions and input width (n_embd) of the recurrent checks


def _seq_hidden(width):
    # H = width at 3; a fixed 6 at 27, where finite differences over the GRU's three
    # (C + H) x H weights would cost seconds per case
    return min(width, 6)


def _token_position_inputs(g, n, width, dtype):
    # width plays the vocabulary; 6 position rows for 4 positions, so rows 4 and 5 get zero
    return {"wte": _randn(g, width, 5, dtype=dtype), "wpe": _randn(g, 6, 5, dtype=dtype),
            "idx": torch.randint(0, width, (n, SEQ_T), generator=g)}


def _token_position_reference(wte, wpe, idx):
    return F.embedding(idx, wte) + F.embedding(torch.arange(idx.shape[1]), wpe)


def _recurrent_start(g, n, width, dtype):
    H = _seq_hidden(width)
    return H, {"x": _randn(g, n, SEQ_T, SEQ_C, dtype=dtype),
               "h0": _randn(g, H, dtype=dtype, scale=0.5)}


def _rnn_inputs(g, n, width, dtype):
    H, inputs = _recurrent_start(g, n, width, dtype)
    return inputs | {"w": _randn(g, SEQ_C + H, H, dtype=dtype, scale=0.5),
                     "b": _randn(g, H, dtype=dtype, scale=0.1)}


def _rnn_reference(x, h0, w, b):
    # makemore's RNNCell in a Python loop over t, on the concatenation [x_t, h_prev]
    h, hs = h0.expand(x.shape[0], -1), []
    for t in range(x.shape[1]):
        h = torch.tanh(torch.cat([x[:, t], h], 1) @ w + b)
        hs.append(h)
    return torch.stack(hs, 1)


def _gru_inputs(g, n, width, dtype):
    H, inputs = _recurrent_start(g, n, width, dtype)
    for gate in ("r", "z", "hbar"):
        inputs[f"w_{gate}"] = _randn(g, SEQ_C + H, H, dtype=dtype, scale=0.5)
        inputs[f"b_{gate}"] = _randn(g, H, dtype=dtype, scale=0.1)
    return inputs


def _gru_reference(x, h0, w_r, b_r, w_z, b_z, w_hbar, b_hbar):
    # makemore's GRUCell in a Python loop over t
    h, hs = h0.expand(x.shape[0], -1), []
    for t in range(x.shape[1]):
        xh = torch.cat([x[:, t], h], 1)
        r = torch.sigmoid(xh @ w_r + b_r)
        hbar = torch.tanh(torch.cat([x[:, t], r * h], 1) @ w_hbar + b_hbar)
        z = torch.sigmoid(xh @ w_z + b_z)
        h = (1 - z) * h + z * hbar
        hs.append(h)
    return torch.stack(hs, 1)


def _causal_average_inputs(g, n, width, dtype):
    return {"x": _randn(g, n, 5, width, dtype=dtype, scale=1.5, shift=0.5)}


def _causal_average_reference(x):
    # the explicit lower-triangular averaging matrix: row t holds 1/(t+1) over positions 0..t
    T = x.shape[1]
    avg = torch.tril(torch.ones(T, T, dtype=x.dtype))
    return torch.einsum("ts,nsc->ntc", avg / avg.sum(1, keepdim=True), x)


# --- part 2, sequence layers: input makers and references (above this line) ---


def _batchnorm_reference(x, gain, bias):
    # written from the definition, with torch.var's own Bessel correction, over all but the last dim
    dims = tuple(range(x.ndim - 1))
    mean = x.mean(dims, keepdim=True)
    var = x.var(dims, keepdim=True, unbiased=True)
    return gain * (x - mean) / torch.sqrt(var + normalisation.BN_EPS) + bias


def _padded_cross_entropy_reference(logits, targets):
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=losses.IGNORE_INDEX)


def _flatten_reference(x):
    # concatenating positions 2t and 2t+1, written with indexing rather than a reshape
    return torch.cat([x[:, 0::2], x[:, 1::2]], dim=2)


REGISTRY: dict[str, LayerSpec] = {spec.name: spec for spec in (
    LayerSpec("embedding", "embedding", embedding.embedding_forward, embedding.embedding_backward,
              lambda table, ix: F.embedding(ix, table), _embedding_inputs, ("table",)),
    LayerSpec("linear", "linear", linear.linear_forward, linear.linear_backward,
              lambda x, w, b: F.linear(x, w.T, b), _linear_inputs, ("x", "w", "b")),
    LayerSpec("linear_nobias_3d", "linear", linear.linear_forward, linear.linear_backward,
              lambda x, w: F.linear(x, w.T), _linear_3d_inputs, ("x", "w")),
    LayerSpec("tanh", "tanh", activations.tanh_forward, activations.tanh_backward,
              lambda x: torch.tanh(x), _pointwise_inputs, ("x",)),
    LayerSpec("relu", "relu", activations.relu_forward, activations.relu_backward,
              lambda x: F.relu(x), _pointwise_inputs, ("x",)),
    LayerSpec("gelu", "gelu", activations.gelu_forward, activations.gelu_backward,
              lambda x: F.gelu(x, approximate="tanh"), _pointwise_inputs, ("x",)),
    LayerSpec("batchnorm", "batchnorm", normalisation.batchnorm_forward, normalisation.batchnorm_backward,
              _batchnorm_reference, _batchnorm_inputs, ("x", "gain", "bias")),
    LayerSpec("batchnorm_3d", "batchnorm", normalisation.batchnorm_forward, normalisation.batchnorm_backward,
              _batchnorm_reference, _batchnorm_3d_inputs, ("x", "gain", "bias")),
    LayerSpec("cross_entropy", "cross_entropy", losses.cross_entropy_forward, losses.cross_entropy_backward,
              lambda logits, targets: F.cross_entropy(logits, targets), _cross_entropy_inputs,
              ("logits",)),
    LayerSpec("cross_entropy_padded", "cross_entropy",
              lambda logits, targets: losses.cross_entropy_forward(logits, targets, losses.IGNORE_INDEX),
              losses.cross_entropy_backward, _padded_cross_entropy_reference,
              _padded_cross_entropy_inputs, ("logits",)),
    LayerSpec("cross_entropy_soft", "cross_entropy",
              lambda logits, targets, teacher: losses.cross_entropy_forward(
                  logits, targets, losses.IGNORE_INDEX, losses.SoftTargets(teacher, SOFT_WEIGHT)),
              losses.cross_entropy_backward, _soft_cross_entropy_reference,
              _soft_cross_entropy_inputs, ("logits",)),
    LayerSpec("flatten_consecutive", "flatten_consecutive",
              lambda x: reshape.flatten_consecutive_forward(x, 2), reshape.flatten_consecutive_backward,
              _flatten_reference, _flatten_inputs, ("x",)),
    LayerSpec("layernorm_3d", "layernorm", normalisation.layernorm_forward, normalisation.layernorm_backward,
              lambda x, weight, bias: F.layer_norm(x, x.shape[-1:], weight, bias, normalisation.LN_EPS),
              _layernorm_inputs, ("x", "weight", "bias")),
    *(LayerSpec(name, "attention",
                lambda n_head=n_head, **kw: attention.attention_forward(**kw, n_head=n_head),
                attention.attention_backward, _attention_reference(n_head), _attention_inputs(C, max_T),
                ("x", "w_qkv", "b_qkv", "w_proj", "b_proj"))
      for name, n_head, C, max_T in ATTENTION_ENTRIES),
    LayerSpec("dropout", "dropout", _dropout_fixed, dropout.dropout_backward, _dropout_reference,
              _pointwise_inputs, ("x",)),
    LayerSpec("dropout_p0", "dropout", lambda x: dropout.dropout_forward(x, 0.0, torch.Generator()),
              dropout.dropout_backward, lambda x: x, _pointwise_inputs, ("x",)),
    LayerSpec("block", "block", lambda **kw: transformer.block_forward(**kw, n_head=2), transformer.block_backward,
              _block_reference(2), _block_inputs,
              ("x", "ln1_w", "ln1_b", "w_qkv", "b_qkv", "w_proj", "b_proj", "ln2_w", "ln2_b",
               "w_fc", "b_fc", "w_fc2", "b_fc2")),
    LayerSpec("block_dropout", "block",
              lambda **kw: transformer.block_forward(**kw, n_head=2, dropout=DROPOUT_P,
                                            rng=torch.Generator().manual_seed(DROPOUT_SEED)),
              transformer.block_backward, _block_reference(2, DROPOUT_P), _block_inputs,
              ("x", "ln1_w", "ln1_b", "w_qkv", "b_qkv", "w_proj", "b_proj", "ln2_w", "ln2_b",
               "w_fc", "b_fc", "w_fc2", "b_fc2")),
    # --- part 2, normalisation and attention: entries (above this line) ---
    LayerSpec("sigmoid", "sigmoid", activations.sigmoid_forward, activations.sigmoid_backward,
              lambda x: 1.0 / (1.0 + torch.exp(-x)), _pointwise_inputs, ("x",)),
    LayerSpec("token_position", "token_position", embedding.token_position_forward,
              embedding.token_position_backward, _token_position_reference, _token_position_inputs,
              ("wte", "wpe")),
    LayerSpec("rnn", "rnn", recurrent.rnn_forward, recurrent.rnn_backward, _rnn_reference, _rnn_inputs,
              ("x", "h0", "w", "b")),
    LayerSpec("gru", "gru", recurrent.gru_forward, recurrent.gru_backward, _gru_reference, _gru_inputs,
              ("x", "h0", "w_r", "b_r", "w_z", "b_z", "w_hbar", "b_hbar")),
    LayerSpec("causal_average", "causal_average", bow.causal_average_forward,
              bow.causal_average_backward, _causal_average_reference, _causal_average_inputs,
              ("x",)),
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
