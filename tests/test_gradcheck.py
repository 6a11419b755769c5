import math

import pytest
import torch

from backprop_ninja.checking.gradcheck import compare, finite_difference_grads, format_table, relative_error


def test_compare_reports_a_missing_keepdim_instead_of_broadcasting():
    ref = torch.randn(1, 64)
    row = compare("bngain", ref.view(64), ref)  # values equal, shape differs by a kept dim
    assert not row.shape_ok and not row.approx and not row.exact
    assert math.isnan(row.maxdiff)
    assert "expected [1, 64]" in format_table([row])


def test_compare_exact_approx_and_maxdiff():
    ref = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    assert compare("x", ref.clone(), ref).exact
    close = compare("x", ref + 1e-7, ref)
    assert close.approx and not close.exact and 0 < close.maxdiff < 1e-6
    far = compare("x", ref + 1e-2, ref)
    assert not far.approx and far.maxdiff == pytest.approx(1e-2, rel=1e-3)
    missing = compare("x", None, ref)
    assert missing.shape is None and not missing.approx


def test_relative_error_and_finite_differences():
    x = torch.randn(4, 3, dtype=torch.float64)
    dout = torch.randn(4, 3, dtype=torch.float64)
    numeric = finite_difference_grads(lambda x: x.sin(), {"x": x}, dout)["x"]
    assert relative_error(x.cos() * dout, numeric) < 1e-8
    assert relative_error(torch.zeros_like(x), numeric) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="shape mismatch"):
        relative_error(torch.zeros(3), numeric)
    with pytest.raises(ValueError, match="shape mismatch"):
        finite_difference_grads(lambda x: x.sum(0), {"x": x}, dout)
