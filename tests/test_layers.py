"""Every layer against autograd (through an independent reference forward) and float64 finite
differences, with random upstream gradients, several batch sizes and widths (vocabularies)."""

import inspect
import pkgutil
from importlib import import_module

import pytest
import torch
from hypothesis import given, settings, strategies as st

from backprop_ninja import nn
from backprop_ninja.checking.gradcheck import approx_equal
from backprop_ninja.nn import embedding, losses, normalisation
from backprop_ninja.checking.registry import REGISTRY, check_layer

CASES = [(n, width) for n in (4, 7, 32) for width in (3, 27)]


def layer_modules():
    return [import_module(f"backprop_ninja.nn.{m.name}") for m in pkgutil.iter_modules(nn.__path__)
            if m.name != "registry"]


def test_every_layer_has_a_check():
    pairs = {}
    for module in layer_modules():
        for name, fn in inspect.getmembers(module, inspect.isfunction):
            if name.endswith("_forward") and fn.__module__ == module.__name__:
                pairs[name[: -len("_forward")]] = module
    assert len(pairs) >= 8, f"too few layers found: {sorted(pairs)}"
    checked = {spec.layer for spec in REGISTRY.values()}
    assert set(pairs) == checked, f"layers without a registry entry: {set(pairs) - checked}"
    for name, module in pairs.items():
        assert hasattr(module, f"{name}_backward"), f"{name} has no backward"
    for spec in REGISTRY.values():  # each entry checks the pair it names
        backward = getattr(pairs[spec.layer], f"{spec.layer}_backward")
        assert spec.backward is backward, spec.name


@pytest.mark.parametrize("name", sorted(REGISTRY))
@pytest.mark.parametrize("n,width", CASES)
def test_layer_float64(name, n, width):
    spec = REGISTRY[name]
    chk = check_layer(spec, seed=1000 * n + width, n=n, width=width)
    # the forward is the reference function
    assert chk.out.shape == chk.reference_out.shape
    torch.testing.assert_close(chk.out, chk.reference_out, rtol=1e-12, atol=1e-12)
    assert set(chk.manual) == set(spec.grad_inputs)
    for k, g in chk.manual.items():
        ref = chk.autograd[k]
        assert g.shape == ref.shape, f"{name}.{k}: shape {tuple(g.shape)} != {tuple(ref.shape)}"
        assert g.dtype == ref.dtype
        torch.testing.assert_close(g, ref, rtol=1e-10, atol=1e-12)
        assert ref.abs().max() > 1e-6, "the check must not be driven to a ~zero gradient"
    for k, err in chk.relative_errors().items():
        assert err <= 1e-6, f"{name}.{k}: finite-difference relative error {err:.2e}"


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_layer_float32_matches_autograd(name):
    chk = check_layer(REGISTRY[name], seed=7, n=32, width=27, dtype=torch.float32)
    for k, g in chk.manual.items():
        assert g.dtype == torch.float32
        assert g.shape == chk.autograd[k].shape
        # the project's one "approximately equal" (relative to the largest entry): two correct
        # float32 backwards differ by rounding that grows with the sums they accumulate
        assert approx_equal(g, chk.autograd[k]), \
            f"{name}.{k}: max diff {(g - chk.autograd[k]).abs().max().item():.2e}"


@settings(max_examples=25, deadline=None)
@given(n=st.integers(2, 16), V=st.integers(2, 30), seed=st.integers(0, 2**31 - 1))
def test_dlogits_rows_sum_to_zero(n, V, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, V, generator=g, dtype=torch.float64) * 3
    targets = torch.randint(0, V, (n,), generator=g)
    _, cache = losses.cross_entropy_forward(logits, targets)
    (dlogits,) = losses.cross_entropy_backward(1.0, cache)
    torch.testing.assert_close(dlogits.sum(1), torch.zeros(n, dtype=torch.float64), atol=1e-12, rtol=0)
    # the correct class is pulled up (negative gradient), every other one pushed down
    picked = dlogits[torch.arange(n), targets]
    assert (picked < 0).all()
    assert (dlogits >= 0).sum() == n * (V - 1)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(2, 16), H=st.integers(1, 8), seed=st.integers(0, 2**31 - 1))
def test_batchnorm_dx_sums_to_zero_over_the_batch(n, H, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, H, generator=g, dtype=torch.float64) * 2 + 1
    gain = torch.randn(1, H, generator=g, dtype=torch.float64) * 0.1 + 1
    out, cache = normalisation.batchnorm_forward(x, gain, torch.zeros(1, H, dtype=torch.float64))
    dx, _, _ = normalisation.batchnorm_backward(torch.randn(n, H, generator=g, dtype=torch.float64), cache)
    # the output does not change when a constant is added to a column: dx is orthogonal to it
    torch.testing.assert_close(dx.sum(0), torch.zeros(H, dtype=torch.float64), atol=1e-10, rtol=0)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 20), V=st.integers(1, 10), seed=st.integers(0, 2**31 - 1))
def test_embedding_backward_equals_the_lecture_loop(n, V, seed):
    g = torch.Generator().manual_seed(seed)
    ix = torch.randint(0, V, (n, 3), generator=g)
    demb = torch.randn(n, 3, 4, generator=g, dtype=torch.float64)
    (dC,) = embedding.embedding_backward(demb, embedding.EmbeddingCache(ix, V))
    loop = torch.zeros(V, 4, dtype=torch.float64)  # the lecture's double loop
    for k in range(n):
        for j in range(3):
            loop[ix[k, j]] += demb[k, j]
    torch.testing.assert_close(dC, loop, rtol=1e-12, atol=1e-12)


def test_batch_of_one_is_rejected():
    from backprop_ninja.errors import UserError
    x = torch.randn(1, 4)
    with pytest.raises(UserError, match="at least 2"):
        normalisation.batchnorm_forward(x, torch.ones(1, 4), torch.zeros(1, 4))


def test_a_batch_whose_every_target_is_ignored_has_a_zero_gradient():
    """No target counts: the loss is a mean over nothing (NaN, as F.cross_entropy's) and the
    gradient zero, with the logits' shape (it once divided by zero)."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 4, 7, generator=g, dtype=torch.float64)
    targets = torch.full((3, 4), losses.IGNORE_INDEX)
    loss, cache = losses.cross_entropy_forward(logits, targets, losses.IGNORE_INDEX)
    reference = torch.nn.functional.cross_entropy(logits.view(-1, 7), targets.view(-1),
                                                  ignore_index=losses.IGNORE_INDEX)
    assert torch.isnan(loss) and torch.isnan(reference)
    for dloss in (1.0, torch.tensor(0.5, dtype=torch.float64)):
        (dlogits,) = losses.cross_entropy_backward(dloss, cache)
        assert dlogits.shape == logits.shape and dlogits.dtype == logits.dtype
        assert torch.equal(dlogits, torch.zeros_like(logits))
    # one target that counts: the ordinary gradient again, as autograd's
    targets[1, 2] = 3
    x = logits.clone().requires_grad_(True)
    torch.nn.functional.cross_entropy(x.view(-1, 7), targets.view(-1),
                                      ignore_index=losses.IGNORE_INDEX).backward()
    _, cache = losses.cross_entropy_forward(logits, targets, losses.IGNORE_INDEX)
    torch.testing.assert_close(losses.cross_entropy_backward(1.0, cache)[0], x.grad)
