"""check-layer's evidence: planted-bug layers (each report names the wrong input and, for the
classic mistakes, the mistake) and the correct versions of the same layers, which pass, in
float32 at realistic sizes too."""

from __future__ import annotations

import math

import pytest
import torch

from backprop_ninja.checking.layer import check_layer


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------
# correct layers: f(*inputs) and f_backward(dout, *inputs), a few autograd.Functions and pairs

def linear(x, w, b):
    return x @ w + b


def linear_backward(dout, x, w, b):
    return dout @ w.T, x.T @ dout, dout.sum(0)


def mul(a, b):
    return a * b


def mul_backward(dout, a, b):
    return dout * b, dout * a


def matmul(a, b):
    return a @ b


def matmul_backward(dout, a, b):
    return dout @ b.T, a.T @ dout


def residual(x, w):
    return x @ w + x


def residual_backward(dout, x, w):
    return dout @ w.T + dout, x.T @ dout


class Softmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        y = torch.softmax(x, -1)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, dout):
        (y,) = ctx.saved_tensors
        return y * (dout - (y * dout).sum(-1, keepdim=True))


def log_softmax(x):
    return x - x.logsumexp(-1, keepdim=True)


def log_softmax_backward(dout, x):
    return dout - torch.softmax(x, -1) * dout.sum(-1, keepdim=True)


def layernorm(x, w, b, eps=1e-5):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) * (var + eps) ** -0.5 * w + b


def layernorm_parts(x, eps=1e-5):
    mean = x.mean(-1, keepdim=True)
    rstd = (((x - mean) ** 2).mean(-1, keepdim=True) + eps) ** -0.5
    return (x - mean) * rstd, rstd


def layernorm_backward(dout, x, w, b):
    xhat, rstd = layernorm_parts(x)
    dxhat = dout * w
    dx = rstd * (dxhat - dxhat.mean(-1, keepdim=True)
                 - xhat * (dxhat * xhat).mean(-1, keepdim=True))
    return dx, (dout * xhat).sum((0, 1)), dout.sum((0, 1))


def batchnorm(x, gain, bias, eps=1e-5):
    mean = x.mean(0, keepdim=True)
    var = x.var(0, keepdim=True, unbiased=True)
    return gain * (x - mean) / (var + eps).sqrt() + bias


def batchnorm_backward(dout, x, gain, bias, eps=1e-5):
    n = x.shape[0]
    var_inv = (x.var(0, keepdim=True, unbiased=True) + eps) ** -0.5
    xhat = (x - x.mean(0, keepdim=True)) * var_inv
    dx = gain * var_inv / n * (n * dout - dout.sum(0, keepdim=True)
                               - n / (n - 1) * xhat * (dout * xhat).sum(0, keepdim=True))
    return dx, (dout * xhat).sum(0, keepdim=True), dout.sum(0, keepdim=True)


def attention(q, k, v):
    T, hs = q.shape[-2], q.shape[-1]
    scores = q @ k.transpose(-2, -1) / math.sqrt(hs)
    mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    att = torch.softmax(scores.masked_fill(~mask, float("-inf")), -1)
    return att @ v


def attention_backward(dy, q, k, v):
    T, hs = q.shape[-2], q.shape[-1]
    scores = q @ k.transpose(-2, -1) / math.sqrt(hs)
    mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    att = torch.softmax(scores.masked_fill(~mask, float("-inf")), -1)
    datt = dy @ v.transpose(-2, -1)
    dv = att.transpose(-2, -1) @ dy
    dscores = att * (datt - (att * datt).sum(-1, keepdim=True)) / math.sqrt(hs)
    return dscores @ k, dscores.transpose(-2, -1) @ q, dv


class Gelu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))

    @staticmethod
    def backward(ctx, dout):
        (x,) = ctx.saved_tensors
        cdf = 0.5 * (1 + torch.erf(x / math.sqrt(2)))
        pdf = torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
        return dout * (cdf + x * pdf)


def embedding(table, idx):
    return table[idx]


def embedding_backward(dout, table, idx):
    dtable = torch.zeros_like(table)
    dtable.index_add_(0, idx.reshape(-1), dout.reshape(-1, table.shape[1]))
    return dtable, None


def conv1d(x, w):
    """x (n, C, L), w (O, C, K): a valid convolution written with unfold."""
    return torch.einsum("nctk,ock->not", x.unfold(2, w.shape[2], 1), w)


def conv1d_backward(dout, x, w):
    K = w.shape[2]
    dw = torch.einsum("not,nctk->ock", dout, x.unfold(2, K, 1))
    dx = torch.zeros_like(x)
    for k in range(K):
        dx[:, :, k:k + dout.shape[2]] += torch.einsum("not,oc->nct", dout, w[:, :, k])
    return dx, dw


def normalise_rows(x):
    return x / x.sum(-1, keepdim=True)


def normalise_rows_backward(dout, x):
    s = x.sum(-1, keepdim=True)
    return dout / s - (dout * x).sum(-1, keepdim=True) / s ** 2


def batch_mean(x):
    return x.mean(0, keepdim=True)


def batch_mean_backward(dout, x):
    return dout.expand_as(x) / x.shape[0]


def variance(x):
    return x.var(0, unbiased=True)


def variance_backward(dout, x):
    return 2 * (x - x.mean(0)) / (x.shape[0] - 1) * dout


class Tanh(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, dout):
        (y,) = ctx.saved_tensors
        return dout * (1 - y ** 2)


def squared_difference(a, b):
    return (a - b) ** 2


def squared_difference_backward(dout, a, b):
    return 2 * (a - b) * dout, -2 * (a - b) * dout


class Sigmoid(torch.autograd.Function):
    """The newer style: forward without ctx, and setup_context."""

    @staticmethod
    def forward(x):
        return torch.sigmoid(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, dout):
        (y,) = ctx.saved_tensors
        return dout * y * (1 - y)


def affine_forward(x, w, b):
    return x @ w + b, (x, w)


def affine_backward(dout, cache):
    x, w = cache
    return dout @ w.T, x.T @ dout, dout.sum(0)


def cross_entropy(logits, targets):
    return torch.nn.functional.cross_entropy(logits, targets)


def cross_entropy_backward(dout, logits, targets):
    onehot = torch.nn.functional.one_hot(targets, logits.shape[1]).to(logits.dtype)
    return dout * (torch.softmax(logits, 1) - onehot) / logits.shape[0], None


def relu_forward(x):
    return x.clamp(min=0), x


def relu_backward(dout, cache):
    return dout * (cache > 0)


# ---------------------------------------------------------------------------------------------
# planted bugs

def linear_db_unsummed(dout, x, w, b):
    return dout @ w.T, x.T @ dout, dout


def linear_dx_untransposed(dout, x, w, b):
    return dout @ w, x.T @ dout, dout.sum(0)


def mul_swapped(dout, a, b):
    return dout * a, dout * b


def matmul_db_untransposed(dout, a, b):
    return dout @ b.T, a @ dout


def residual_overwritten(dout, x, w):
    dx = dout @ w.T
    dx = dout  # noqa: F841 -- the bug: = where += belongs
    return dx, x.T @ dout


class SoftmaxKeepdimDropped(Softmax):
    @staticmethod
    def backward(ctx, dout):
        (y,) = ctx.saved_tensors
        return y * (dout - (y * dout).sum(-1))


class SoftmaxSignFlipped(Softmax):
    @staticmethod
    def backward(ctx, dout):
        (y,) = ctx.saved_tensors
        return -y * (dout - (y * dout).sum(-1, keepdim=True))


def log_softmax_sum_term_missing(dout, x):
    return dout


def layernorm_dw_unsummed(dout, x, w, b):
    dx, _, db = layernorm_backward(dout, x, w, b)
    return dx, dout * layernorm_parts(x)[0], db


def layernorm_view(dout, x, w, b):
    flat = x.view(-1, x.shape[-1])  # the bug: view needs a contiguous x
    dx, dw, db = layernorm_backward(dout, flat.view(x.shape), w, b)
    return dx, dw, db


def batchnorm_dbias_keepdim_dropped(dout, x, gain, bias):
    dx, dgain, _ = batchnorm_backward(dout, x, gain, bias)
    return dx, dgain, dout.sum(0)


def batchnorm_dx_zeros(dout, x, gain, bias):
    _, dgain, dbias = batchnorm_backward(dout, x, gain, bias)
    return torch.zeros_like(x), dgain, dbias


def attention_dq_dk_swapped(dy, q, k, v):
    dq, dk, dv = attention_backward(dy, q, k, v)
    return dk, dq, dv


class GeluSignFlipped(Gelu):
    @staticmethod
    def backward(ctx, dout):
        return -Gelu.backward(ctx, dout)


class GeluUpstreamIgnored(Gelu):
    @staticmethod
    def backward(ctx, dout):
        return Gelu.backward(ctx, torch.ones_like(dout))


def embedding_assigned(dout, table, idx):
    dtable = torch.zeros_like(table)
    dtable[idx.reshape(-1)] = dout.reshape(-1, table.shape[1])
    return dtable, None


def conv1d_dw_mean(dout, x, w):
    dx, dw = conv1d_backward(dout, x, w)
    return dx, dw / x.shape[0]


def normalise_rows_keepdim_dropped(dout, x):
    s = x.sum(-1)
    return dout / s - (dout * x).sum(-1) / s ** 2


def batch_mean_missing_mean(dout, x):
    return dout.expand_as(x)


def batch_mean_hard_coded(dout, x):
    return dout.expand_as(x) / 32


def variance_biased(dout, x):
    return 2 * (x - x.mean(0)) / x.shape[0] * dout


class TanhInPlace(Tanh):
    @staticmethod
    def backward(ctx, dout):
        (y,) = ctx.saved_tensors
        return dout.mul_(1 - y ** 2)


def squared_difference_db_sign(dout, a, b):
    return 2 * (a - b) * dout, 2 * (a - b) * dout


class SigmoidWrong(Sigmoid):
    @staticmethod
    def backward(ctx, dout):
        (y,) = ctx.saved_tensors
        return dout * y


def affine_backward_mean(dout, cache):
    x, w = cache
    return dout @ w.T, x.T @ dout, dout.mean(0)


def cross_entropy_sum(dout, logits, targets):
    onehot = torch.nn.functional.one_hot(targets, logits.shape[1]).to(logits.dtype)
    return dout * (torch.softmax(logits, 1) - onehot), None


def relu_backward_float32(dout, cache):
    return (dout * (cache > 0)).float()


def matmul_by_identity(dout, a, b):
    grads = {id(a): dout @ b.T}
    grads[id(b)] = a.T @ dout   # with a is b this overwrites a's
    return grads[id(a)], grads[id(b)]


def bn_inputs(n=8, C=6, seed=0):
    return {"x": randn(n, C, seed=seed), "gain": 1 + 0.1 * randn(1, C, seed=seed + 1),
            "bias": randn(1, C, seed=seed + 2)}


def ln_inputs(n=4, T=3, C=6, seed=0):
    return {"x": randn(n, T, C, seed=seed), "w": 1 + 0.1 * randn(C, seed=seed + 1),
            "b": randn(C, seed=seed + 2)}


def attn_inputs(n=3, T=5, hs=4, seed=0):
    return {"q": randn(n, T, hs, seed=seed), "k": randn(n, T, hs, seed=seed + 1),
            "v": randn(n, T, hs, seed=seed + 2)}


def emb_inputs(n=6, V=5, C=4, seed=0):
    idx = torch.randint(0, V, (n, 3), generator=torch.Generator().manual_seed(seed))
    return {"table": randn(V, C, seed=seed), "idx": idx}


def ce_inputs(n=7, V=5, seed=0):
    targets = torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(seed))
    return {"logits": randn(n, V, seed=seed), "targets": targets}


def pos(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) + 0.5


# name: (fn, backward or None, inputs, wrong input, words the diagnosis must contain)
BUGS = {
    "linear: db not summed over the batch": (
        linear, linear_db_unsummed, lambda: {"x": randn(6, 8), "w": randn(8, 5), "b": randn(5)},
        "b", ["broadcast along dim [0]", "Summing yours over it gives the right answer"]),
    "linear: dx missing the transpose (square w)": (
        linear, linear_dx_untransposed,
        lambda: {"x": randn(6, 8), "w": randn(8, 8, seed=1), "b": randn(8)},
        "x", ["uses w where w.T belongs", "missing transpose"]),
    "mul: gradients swapped": (
        mul, mul_swapped, lambda: {"a": randn(5, 4), "b": randn(5, 4, seed=1)},
        "a", ["swapped"]),
    "matmul: db missing the transpose": (
        matmul, matmul_db_untransposed, lambda: {"a": randn(6, 6), "b": randn(6, 6, seed=1)},
        "b", ["uses a where a.T belongs"]),
    "residual: dx overwritten by the skip branch": (
        residual, residual_overwritten, lambda: {"x": randn(5, 7), "w": randn(7, 7, seed=1)},
        "x", ["only the gradient through its use in add()", "also feeds matmul()", "+="]),
    "softmax: keepdim dropped": (
        SoftmaxKeepdimDropped, None, lambda: {"x": randn(6, 10)},
        "x", ["keepdim=True", "line"]),
    "softmax: sign flipped": (
        SoftmaxSignFlipped, None, lambda: {"x": randn(6, 10)}, "x", ["sign is flipped"]),
    "log-softmax: the sum term missing": (
        log_softmax, log_softmax_sum_term_missing, lambda: {"x": randn(6, 10)},
        "x", ["only the gradient through its use in sub()", "also feeds logsumexp()"]),
    "layer norm: dw not summed over the rows": (
        layernorm, layernorm_dw_unsummed, ln_inputs,
        "w", ["broadcast along dim [0, 1]", "Summing yours"]),
    "layer norm: view on a non-contiguous x": (
        layernorm, layernorm_view, ln_inputs, "x", ["view", "line"]),
    "batchnorm: dbias keepdim dropped": (
        batchnorm, batchnorm_dbias_keepdim_dropped, bn_inputs,
        "bias", ["dimension of size 1 was dropped (dim 0)", "keepdim=True"]),
    "batchnorm: dx all zeros": (
        batchnorm, batchnorm_dx_zeros, bn_inputs, "x", ["all zeros"]),
    "attention: dq and dk swapped": (
        attention, attention_dq_dk_swapped, attn_inputs, "q", ["swapped"]),
    "GELU: sign flipped": (GeluSignFlipped, None, lambda: {"x": randn(8, 5)}, "x",
                           ["sign is flipped"]),
    "GELU: upstream ignored": (GeluUpstreamIgnored, None, lambda: {"x": randn(8, 5)}, "x",
                               ["ignores the upstream gradient"]),
    "embedding: rows assigned, repeated indices": (
        embedding, embedding_assigned, emb_inputs, "table", ["looked up several times", "+="]),
    "conv1d with unfold: dw a mean over the batch": (
        conv1d, conv1d_dw_mean, lambda: {"x": randn(3, 2, 9), "w": randn(4, 2, 3, seed=1)},
        "w", ["3 times too small", "dim 0 of x"]),
    "reduction with keepdim: keepdim dropped in the backward": (
        normalise_rows, normalise_rows_keepdim_dropped, lambda: {"x": pos(6, 4)},
        "x", ["keepdim=True"]),
    "batch mean: the 1/n missing": (
        batch_mean, batch_mean_missing_mean, lambda: {"x": randn(7, 3)},
        "x", ["7 times too big", "dim 0 of x"]),
    "batch mean: batch size hard-coded": (
        batch_mean, batch_mean_hard_coded, lambda: {"x": randn(32, 3)},
        "x", ["batch 1"]),
    "variance: n where n-1 belongs": (
        variance, variance_biased, lambda: {"x": randn(7, 3)},
        "x", ["divides by n = 7", "n-1 = 6 belongs", "Bessel"]),
    "tanh: dout changed in place": (TanhInPlace, None, lambda: {"x": randn(8, 5)}, "dout",
                                    ["changed dout in place"]),
    "squared difference: db sign flipped": (
        squared_difference, squared_difference_db_sign,
        lambda: {"a": randn(5, 4), "b": randn(5, 4, seed=1)}, "b", ["sign is flipped"]),
    "sigmoid (setup_context): a factor missing": (
        SigmoidWrong, None, lambda: {"x": randn(8, 5)}, "x", ["no classic mistake recognised"]),
    "affine pair: db a mean": (
        (affine_forward, affine_backward_mean), None,
        lambda: {"x": randn(6, 8), "w": randn(8, 5), "b": randn(5)},
        "b", ["6 times too small"]),
    "cross-entropy (a scalar loss): the 1/n of the mean missing": (
        cross_entropy, cross_entropy_sum, ce_inputs,
        "logits", ["7 times too big", "dim 0 of logits"]),
    "relu pair: gradient in float32": (
        (relu_forward, relu_backward_float32), None, lambda: {"x": randn(6, 8)},
        "x", ["float32 for a float64 x"]),
    "matmul: gradients told apart by identity": (
        matmul, matmul_by_identity, lambda: {"a": randn(5, 5), "b": randn(5, 5, seed=1)},
        "a", ["the same tensor is passed as a and b"]),
}


@pytest.mark.parametrize("case", list(BUGS))
def test_planted_bug_is_named(case):
    fn, backward, inputs, wrong, words = BUGS[case]
    report = check_layer(fn, inputs(), backward=backward)
    assert not report.ok
    assert wrong in report.diagnosis, report.text()
    text = report.diagnosis[wrong]
    for word in words:
        assert word in text, f"{word!r} not in the diagnosis of {wrong}:\n{report.text()}"


# name: (fn, backward or None, inputs at a small size, inputs at a realistic size)
CORRECT = {
    "linear": (linear, linear_backward,
               lambda: {"x": randn(6, 8), "w": randn(8, 5), "b": randn(5)},
               lambda: {"x": randn(64, 256), "w": randn(256, 512) / 16, "b": randn(512)}),
    "mul": (mul, mul_backward, lambda: {"a": randn(5, 4), "b": randn(5, 4, seed=1)},
            lambda: {"a": randn(64, 512), "b": randn(64, 512, seed=1)}),
    "matmul": (matmul, matmul_backward, lambda: {"a": randn(6, 6), "b": randn(6, 6, seed=1)},
               lambda: {"a": randn(128, 128), "b": randn(128, 128, seed=1)}),
    "residual": (residual, residual_backward,
                 lambda: {"x": randn(5, 7), "w": randn(7, 7, seed=1)},
                 lambda: {"x": randn(64, 128), "w": randn(128, 128, seed=1) / 11}),
    "softmax": (Softmax, None, lambda: {"x": randn(6, 10)}, lambda: {"x": 3 * randn(64, 1000)}),
    "log-softmax": (log_softmax, log_softmax_backward, lambda: {"x": randn(6, 10)},
                    lambda: {"x": 3 * randn(64, 1000)}),
    "layer norm": (layernorm, layernorm_backward, ln_inputs, lambda: ln_inputs(32, 16, 64)),
    "batchnorm": (batchnorm, batchnorm_backward, bn_inputs, lambda: bn_inputs(64, 200)),
    "attention": (attention, attention_backward, attn_inputs, lambda: attn_inputs(8, 32, 16)),
    "GELU": (Gelu, None, lambda: {"x": randn(8, 5)}, lambda: {"x": randn(64, 512)}),
    "embedding": (embedding, embedding_backward, emb_inputs, lambda: emb_inputs(64, 27, 32)),
    "conv1d": (conv1d, conv1d_backward, lambda: {"x": randn(3, 2, 9), "w": randn(4, 2, 3, seed=1)},
               lambda: {"x": randn(16, 8, 64), "w": randn(16, 8, 5, seed=1)}),
    "normalise rows": (normalise_rows, normalise_rows_backward, lambda: {"x": pos(6, 4)},
                       lambda: {"x": pos(64, 256)}),
    "batch mean": (batch_mean, batch_mean_backward, lambda: {"x": randn(7, 3)},
                   lambda: {"x": randn(256, 128)}),
    "variance": (variance, variance_backward, lambda: {"x": randn(7, 3)},
                 lambda: {"x": randn(256, 128)}),
    "tanh": (Tanh, None, lambda: {"x": randn(8, 5)}, lambda: {"x": randn(64, 512)}),
    "squared difference": (squared_difference, squared_difference_backward,
                           lambda: {"a": randn(5, 4), "b": randn(5, 4, seed=1)},
                           lambda: {"a": randn(64, 512), "b": randn(64, 512, seed=1)}),
    "sigmoid": (Sigmoid, None, lambda: {"x": randn(8, 5)}, lambda: {"x": randn(64, 512)}),
    "affine pair": ((affine_forward, affine_backward), None,
                    lambda: {"x": randn(6, 8), "w": randn(8, 5), "b": randn(5)},
                    lambda: {"x": randn(64, 256), "w": randn(256, 512) / 16, "b": randn(512)}),
    "cross-entropy": (cross_entropy, cross_entropy_backward, ce_inputs,
                      lambda: ce_inputs(256, 27)),
    "relu pair": ((relu_forward, relu_backward), None, lambda: {"x": randn(6, 8)},
                  lambda: {"x": randn(64, 512)}),
}


@pytest.mark.parametrize("case", list(CORRECT))
@pytest.mark.parametrize("size", ["small", "realistic"])
def test_correct_layer_passes(case, size):
    fn, backward, small, realistic = CORRECT[case]
    inputs = small() if size == "small" else realistic()
    report = check_layer(fn, inputs, backward=backward)
    assert report.ok, report.text()
    assert report.checks[1].label.startswith("float32")


def test_every_bug_has_its_correct_layer():
    """Each planted bug is a variant of a layer that passes."""
    assert len(BUGS) >= 20
    correct = [forward_of(fn) for fn, *_ in CORRECT.values()]
    for name, (fn, *_rest) in BUGS.items():
        f = forward_of(fn)
        assert any(f is c or isinstance(f, type) and isinstance(c, type) and issubclass(f, c)
                   for c in correct), name


def forward_of(fn):
    return fn[0] if isinstance(fn, tuple) else fn
