"""check-layer's interfaces: the command line (exit codes 0, 1, 2; --json; files with an
autograd.Function, a pair, f and f_backward), the Python API and the pytest helper, the oracles
it picks, and the shared recognisers of ``checking.diagnose``."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from backprop_ninja.checking import diagnose
from backprop_ninja.checking.layer_adapt import LayerError, parse_shapes
from backprop_ninja.cli import main

SRC = str(Path(__file__).resolve().parents[1] / "src")

GELU = '''
import math
import torch


class FusedGelu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))

    @staticmethod
    def backward(ctx, dout):
        (x,) = ctx.saved_tensors
        cdf = 0.5 * (1 + torch.erf(x / math.sqrt(2)))
        pdf = torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
        return {sign}dout * (cdf + x * pdf)
'''

LAYERS = '''
import numpy as np
import torch


def affine_forward(x, w, b):
    return x @ w + b, (x, w)


def affine_backward(dout, cache):
    x, w = cache
    return dout @ w.T, x.T @ dout, dout.sum(0)


def embed(table, idx):
    return table[idx]


def embed_backward(dout, table, idx):
    d = torch.zeros_like(table)
    d[idx.reshape(-1)] = dout.reshape(-1, table.shape[1])   # assigned: repeated rows lose
    return d, None


def square(x):
    """Through numpy: autograd cannot follow it."""
    return torch.from_numpy(np.square(x.numpy()))


def square_backward(dout, x):
    return {factor} * x * dout


def square_reference(x):
    return x * x


def cube(x):
    return x ** 3


def cube_backward(dout, x):
    return 3 * x * x * dout


def not_the_cube(x):
    return x ** 2
'''


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main(["check-layer", *argv])
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------------------------------------
# the command line

def test_cli_correct_function_exits_0(tmp_path, capsys):
    path = write(tmp_path, "gelu.py", GELU.format(sign=""))
    code, out, _ = run_cli(capsys, str(path), "--shapes", "x=32x64")
    assert code == 0, out
    assert "all gradients match" in out and "float32, random dout" in out
    assert "autograd of the forward itself" in out


def test_cli_sign_flip_exits_1_and_names_it(tmp_path, capsys):
    path = write(tmp_path, "gelu.py", GELU.format(sign="-"))
    code, out, _ = run_cli(capsys, f"{path}:FusedGelu", "--shapes", "x=32x64")
    assert code == 1
    assert "x: dx is the right answer times -1: the sign is flipped" in out


def test_cli_json(tmp_path, capsys):
    path = write(tmp_path, "gelu.py", GELU.format(sign="-"))
    code, out, _ = run_cli(capsys, str(path), "--shapes", "x=8x5", "--json")
    data = json.loads(out)
    assert code == 1 and data["ok"] is False
    assert "sign is flipped" in data["diagnosis"]["x"]
    first = data["checks"][0]
    assert first["check"] == "float64, random dout" and first["gradients"]["x"]["status"] == "wrong"


def test_cli_pair_by_its_short_name(tmp_path, capsys):
    path = write(tmp_path, "layers.py", LAYERS.format(factor=2))
    code, out, _ = run_cli(capsys, f"{path}:affine", "--shapes", "x=16x8,w=8x4,b=4")
    assert code == 0, out
    assert "forward/backward pair" in out


def test_cli_integer_inputs_and_embedding_rows(tmp_path, capsys):
    path = write(tmp_path, "layers.py", LAYERS.format(factor=2))
    code, out, _ = run_cli(capsys, f"{path}:embed", "--shapes", "idx=6x3:int<5,table=5x4")
    assert code == 1
    assert "table: dtable is right for the rows of table looked up once" in out
    assert "dtable[idx] = demb" in out


def test_cli_finite_differences_only_and_a_reference(tmp_path, capsys):
    path = write(tmp_path, "layers.py", LAYERS.format(factor=3))
    code, out, _ = run_cli(capsys, f"{path}:square", "--shapes", "x=7x3")
    assert code == 1
    assert "finite differences only" in out
    assert "dx is the right answer times 1.5" in out   # diagnosed by finite differences
    code, out, _ = run_cli(capsys, f"{path}:square", "--shapes", "x=7x3",
                           "--reference", "square_reference")
    assert code == 1 and "autograd of the reference square_reference" in out


@pytest.mark.parametrize("argv, words", [
    (["{dir}/nope.py", "--shapes", "x=3"], "no such file"),
    (["{dir}/layers.py:cube", "--shapes", "x=3x"], "cannot read 'x=3x'"),
    (["{dir}/layers.py:cube", "--shapes", "x=3,x=4"], "x is given twice"),
    (["{dir}/layers.py:nothing", "--shapes", "x=3"], "has no 'nothing'"),
    (["{dir}/layers.py", "--shapes", "x=3"], "name the layer as"),
    (["{dir}/layers.py:cube", "--shapes", "y=3"], "cube has no parameter 'y'"),
    (["{dir}/layers.py:cube", "--shapes", "x=3x4x5x6", "--batch", "w"], "not a tensor input"),
    (["{dir}/layers.py:cube", "--shapes", "x=3:int<4"], "no floating-point tensor"),
    (["{dir}/layers.py:cube", "--shapes", "x=3", "--reference", "missing"], "no function"),
    (["{dir}/layers.py:cube", "--shapes", "x=3", "--reference", "not_the_cube"],
     "the reference's output differs"),
    (["{dir}/broken.py", "--shapes", "x=3"], "broken.py, line 3, raised SyntaxError"),
])
def test_cli_could_not_run_exits_2_in_one_line(tmp_path, capsys, argv, words):
    write(tmp_path, "layers.py", LAYERS.format(factor=2))
    write(tmp_path, "broken.py", "import torch\n\ndef f(x:\n")
    code, out, err = run_cli(capsys, *[a.format(dir=tmp_path) for a in argv])
    assert code == 2 and out == ""
    assert words in err and len(err.strip().splitlines()) == 1, err


def test_cli_module_and_package_do_not_import_torch():
    """--help and argument errors of check-layer need no torch: its module imports it in the
    command; the package exports check_layer lazily."""
    code = "import sys, backprop_ninja; assert 'torch' not in sys.modules; print('ok')"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={"PYTHONPATH": SRC})
    assert result.stdout.strip() == "ok", result.stderr
    module = ast.parse((Path(SRC) / "backprop_ninja/cli/check_layer.py").read_text())
    top = [n for n in module.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert all(n.module == "__future__" if isinstance(n, ast.ImportFrom) else
               all(a.name == "argparse" for a in n.names) for n in top)


# ---------------------------------------------------------------------------------------------
# the Python API

def test_api_and_assert_backward():
    from backprop_ninja import assert_backward, check_layer

    def f(x, w):
        return torch.tanh(x @ w)

    def f_backward(dout, x, w):
        da = dout * (1 - torch.tanh(x @ w) ** 2)
        return da @ w.T, x.T @ da

    def f_backward_wrong(dout, x, w):
        da = dout * (1 - torch.tanh(x @ w))
        return da @ w.T, x.T @ da

    inputs = {"w": torch.randn(5, 3), "x": torch.randn(4, 5)}   # passed in f's order
    report = check_layer(f, inputs, backward=f_backward)
    assert report.ok and list(report.inputs) == ["x", "w"]
    assert assert_backward(f, inputs, backward=f_backward).ok
    with pytest.raises(AssertionError) as e:
        assert_backward(f, inputs, backward=f_backward_wrong)
    assert "check" in str(e.value) and "WRONG: 2 of 2 gradients" in str(e.value)


def test_api_reference_and_sequence_inputs():
    from backprop_ninja import check_layer

    def f(x):
        return torch.from_numpy((x.numpy() ** 2).sum(1, keepdims=True))

    report = check_layer(f, [torch.randn(6, 4)], lambda x: (x * x).sum(1, keepdim=True),
                         backward=lambda dout, x: 2 * x * dout)
    assert report.ok and report.oracles[0].startswith("autograd of the reference")


def test_wrong_number_of_gradients_is_a_finding():
    from backprop_ninja import check_layer
    report = check_layer(lambda a, b: a * b, {"a": torch.randn(3), "b": torch.randn(3)},
                         backward=lambda dout, a, b: (dout * b,))
    assert not report.ok and "returned 1 values for 2 inputs" in report.diagnosis["a"]


def test_backward_depending_on_the_batch_size_is_caught_at_batch_1():
    from backprop_ninja import check_layer
    report = check_layer(lambda x: x.sum(0), {"x": torch.randn(4, 3)},
                         backward=lambda dout, x: dout.expand(4, 3).clone())
    assert not report.ok
    assert "dx must have the shape of x, [2, 3]; it has [4, 3]" in report.diagnosis["x"]
    assert "batch 1" in report.diagnosis["x"] and report.checks[0].ok


def test_explicit_batch_inputs():
    from backprop_ninja import check_layer
    report = check_layer(lambda x, w: x @ w, {"x": torch.randn(4, 4), "w": torch.randn(4, 3)},
                         backward=lambda dout, x, w: (dout @ w.T, x.T @ dout), batch=["x"])
    assert report.ok and report.batch == ["x"]
    assert [c.label for c in report.checks if c.label.startswith("batch")] == \
        ["batch 1", "batch 2", "batch 5"]


# ---------------------------------------------------------------------------------------------
# the shared recognisers

def test_dropped_dim_is_named():
    assert diagnose.dropped_dims_text((5,), (5, 1)) == " (dim 1)"
    assert diagnose.dropped_dims_text((5,), (1, 5)) == " (dim 0)"
    assert diagnose.dropped_dims_text((3,), (1, 3, 1)) == " (dims [0, 2])"


def test_size_factors_name_the_size_and_the_bessel_direction():
    ref = torch.randn(7, 3, dtype=torch.float64)
    factors = diagnose.size_factors("x", [(7, "dim 0 of x")])
    assert "7 times too big" in diagnose.factor_hint("x", 7 * ref, ref, factors)
    assert "divides by n = 7" in diagnose.factor_hint("x", ref * 6 / 7, ref, factors)
    assert "divides by n-1 = 6" in diagnose.factor_hint("x", ref * 7 / 6, ref, factors)
    assert "a constant factor is off" in diagnose.factor_hint("x", 1.3 * ref, ref, factors)
    assert "twice the right answer" in diagnose.factor_hint("x", 2 * ref, ref, factors)
    assert "a factor 2 is missing" in diagnose.factor_hint("x", ref / 2, ref, factors)
    assert diagnose.factor_hint("x", torch.randn(7, 3, dtype=torch.float64), ref, factors) is None


def test_exception_hint_for_a_dropped_keepdim():
    try:
        torch.ones(4, 3) / torch.ones(4)
    except RuntimeError as e:
        assert "keepdim=True" in diagnose.exception_hint(e)


def test_parse_shapes():
    assert parse_shapes("x=32x64, idx=32:int<27,v=4:pos,s=scalar") == {
        "x": ((32, 64), "normal"), "idx": ((32,), "int<27"), "v": ((4,), "pos"),
        "s": ((), "normal")}
    with pytest.raises(LayerError, match="size 0"):
        parse_shapes("x=0x3")


def test_non_tensor_inputs_pass_through():
    from backprop_ninja import check_layer
    report = check_layer(lambda x, p: x ** p, {"x": torch.randn(5, 3), "p": 3},
                         backward=lambda dout, x, p: (p * x ** (p - 1) * dout, None))
    assert report.ok and report.floats == ["x"]
