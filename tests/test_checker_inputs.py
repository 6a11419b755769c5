"""What a gradient must be before it is compared: a floating tensor on the reference's device,
compared in float64 (a cast would let an integer tensor of zeros pass for gradients below 1)."""

import math

import pytest
import torch

from backprop_ninja.checking import atomic
from backprop_ninja.learning import checker
from backprop_ninja.checking.gradcheck import APPROX_ATOL, APPROX_RTOL, approx_equal, compare, format_table
from backprop_ninja.training.loop import verify_grads
from backprop_ninja.errors import UserError

REF = torch.full((4, 3), 0.25) * torch.tensor([1.0, -1.0, 0.5])  # all entries below 1

WRONG_KINDS = {
    "integer tensor": (torch.zeros(4, 3, dtype=torch.long), "int64 tensor"),
    "bool tensor": (torch.zeros(4, 3, dtype=torch.bool), "bool tensor"),
    "complex tensor": (REF.to(torch.complex64), "complex64 tensor"),
    "list": (REF.tolist(), "is a list, not a torch tensor"),
    "numpy array": (REF.numpy().copy(), "is a numpy.ndarray, not a torch tensor"),
    "meta device": (torch.empty(4, 3, device="meta"), "is on meta"),
}


@pytest.mark.parametrize("kind", WRONG_KINDS)
def test_compare_refuses_what_is_not_a_floating_tensor(kind):
    value, needle = WRONG_KINDS[kind]
    row = compare("logits", value, REF)
    assert not row.approx and not row.exact and math.isnan(row.maxdiff)
    assert needle in row.problem
    line = format_table([row]).splitlines()[-1]
    assert line.startswith("logits") and "dlogits " + row.problem in line


def test_compare_works_in_float64_whatever_the_dtypes():
    ref = torch.tensor([[0.1, -0.2]], dtype=torch.float32)
    assert compare("x", ref.double(), ref).exact  # the same values, another float dtype
    half = compare("x", ref.half(), ref)
    assert not half.exact and half.maxdiff > 0  # rounded to half: measured, never cast back


def test_approx_is_relative_to_the_tensor_scale_with_a_floor():
    big = torch.tensor([1000.0, 1e-3])
    # an entry near zero inherits the rounding of its large neighbour: still approx
    assert approx_equal(big + torch.tensor([0.0, 1e-3]), big)
    assert not approx_equal(big * (1 + 10 * APPROX_RTOL), big)
    noise = torch.tensor([3e-9, -2e-9])  # a true zero gradient, as float32 noise
    assert approx_equal(-noise, noise)
    assert not approx_equal(noise + 10 * APPROX_ATOL, noise)


def test_large_batch_model_check_has_no_false_alarm():
    """b1's true gradient is 0 under batchnorm: at batch 4096 both sides are noise."""
    from backprop_ninja.checking.models import autograd_param_grads
    from backprop_ninja.models import mlp
    from backprop_ninja.models.base import loss_and_grads

    g = torch.Generator().manual_seed(0)
    params = mlp.init(mlp.Config(27, 3, 10, 256), g)
    X, Y = torch.randint(0, 27, (4096, 3), generator=g), torch.randint(0, 27, (4096,), generator=g)
    _, grads = loss_and_grads(mlp.SPEC, params, X, Y)
    reference = autograd_param_grads(mlp.SPEC, params, X, Y)
    assert all(compare(k, grads[k], reference[k]).approx for k in grads)
    verify_grads(grads, reference, step=0)  # --check-grads raises on a false alarm


def test_check_grads_refuses_a_wrong_gradient():
    ref = {"W": torch.randn(3, 3)}
    with pytest.raises(UserError, match="dW differs from autograd"):
        verify_grads({"W": ref["W"].long()}, ref, step=5)
    with pytest.raises(UserError, match="dW differs from autograd"):
        verify_grads({"W": ref["W"] * (1 + 1e-3)}, ref, step=5)


@pytest.fixture(scope="module")
def setup():
    return atomic.lecture_check_setup()


@pytest.mark.parametrize("value, needle", [
    ("torch.zeros(logits.shape, dtype=torch.long)", "dlogits is a int64 tensor"),
    ("torch.zeros(logits.shape, dtype=torch.bool)", "dlogits is a bool tensor"),
    ("torch.zeros(logits.shape, dtype=torch.complex64)", "dlogits is a complex64 tensor"),
    ("torch.zeros(logits.shape).tolist()", "dlogits is a list, not a torch tensor"),
    ("torch.zeros(logits.shape).numpy()", "dlogits is a numpy.ndarray, not a torch tensor"),
    ("torch.zeros(logits.shape, device='meta')", "dlogits is on meta"),
])
def test_exercise_checker_names_a_gradient_of_the_wrong_kind(tmp_path, setup, value, needle):
    path = tmp_path / "mine.py"
    path.write_text(f"import torch\n\ndef backward(logits, Yb):\n    return {{'logits': {value}}}\n")
    result = checker.check(2, path, setup=setup)
    assert not result.ok and "well done" not in result.text
    assert needle in result.text
    assert "0/1 gradients match" in result.text
