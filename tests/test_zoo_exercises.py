"""Exercises 5 to 8, the zoo's layers: each solution passes, each starter fails at its first
blank, and each layer's classic mistakes, planted in the solution, are caught at the right
tensor with the right hint."""

from pathlib import Path

import pytest
import torch
from torch.nn import functional

from backprop_ninja.errors import UserError
from backprop_ninja.checking.gradcheck import approx_equal
from backprop_ninja.learning import exercises
from backprop_ninja.learning import zoo_exercises as zoo
from backprop_ninja.learning.learner import learner_function, load_learner
from backprop_ninja.nn.normalisation import batchnorm_forward
from backprop_ninja.nn.recurrent import rnn_forward

NUMBERS = sorted(zoo.ZOO_CHECKS)


def write(tmp_path: Path, text: str, name: str = "mine.py") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def planted(number: int, old: str, new: str, count: int = 1) -> str:
    """The solution of an exercise with one mistake planted in it (``old`` found ``count``
    times, each replaced)."""
    text = exercises.solution_text(number)
    assert text.count(old) == count, old
    return text.replace(old, new)


def grade(number: int, path: Path):
    return zoo.ZOO_CHECKS[number](learner_function(load_learner(path), path), path)


def first_wrong(text: str) -> str:
    line = next(l for l in text.splitlines() if l.startswith("first wrong:"))
    return line.split()[2]


# ---------------------------------------------------------------------------------------------
# templates, starters, solutions

@pytest.mark.parametrize("number", NUMBERS)
def test_solution_passes(number, tmp_path):
    g = grade(number, write(tmp_path, exercises.solution_text(number)))
    assert g.ok, g.text()
    assert [r.name for r in g.rows] == list(zoo.ZOO_NAMES[number])
    assert "all correct" in g.text() and g.title == zoo.ZOO_TITLES[number]


@pytest.mark.parametrize("number", NUMBERS)
def test_starter_fails_at_its_first_blank(number, tmp_path):
    starter = exercises.starter_text(number)
    first = zoo.ZOO_NAMES[number][0]
    lines = starter.splitlines()
    line = next(i for i, l in enumerate(lines, 1) if l.strip().startswith(f"d{first} = None"))
    result = zoo.check_zoo(number, write(tmp_path, starter))
    assert not result.ok and first_wrong(result.text) == f"d{first}"
    assert f"d{first} is still None: fill in the blank at line {line}" in result.text


@pytest.mark.parametrize("number", NUMBERS)
def test_template_has_one_blank_per_graded_tensor_in_backward_order(number):
    """The blanks are the graded tensors, in order, and the template cuts into a notebook's
    pieces like exercises 1 to 4 (no code between two blanks)."""
    parts = exercises.template_parts(number)
    names = zoo.ZOO_NAMES[number]
    assert [b.name for b in parts.blanks] == [f"d{n}" for n in names]
    assert parts.returned == [(n, f"d{n}") for n in names]
    starter, solution = exercises.starter_text(number), exercises.solution_text(number)
    assert "# BLANK" not in starter + solution and "d" + names[0] + " = None" not in solution
    for blank in parts.blanks:
        assert blank.answer.strip().splitlines()[-1].strip() not in starter


def test_template_forwards_agree_with_the_references(tmp_path):
    """The forward the learner reads is the one the checker differentiates."""
    mods = {n: load_learner(write(tmp_path, exercises.solution_text(n), f"s{n}.py")) for n in NUMBERS}
    t5 = zoo.exercise5_task().inputs
    w, b = torch.randn(8), torch.randn(8)
    out = mods[5].forward(t5["x"], w, b)
    torch.testing.assert_close(out["out"], functional.layer_norm(t5["x"], (8,), w, b))
    torch.testing.assert_close(out["rstd"], t5["rstd"])
    t6 = zoo.exercise6_task().inputs
    out = mods[6].forward(t6["q"], t6["k"], t6["v"])
    torch.testing.assert_close(out["att"], t6["att"])
    torch.testing.assert_close(out["y"], functional.scaled_dot_product_attention(
        t6["q"], t6["k"], t6["v"], is_causal=True))
    t7 = zoo.exercise7_task().inputs
    gain, bias = torch.randn(1, 1, 8), torch.randn(1, 1, 8)
    out = mods[7].forward(t7["x"], gain, bias)
    torch.testing.assert_close(out["out"], batchnorm_forward(t7["x"], gain, bias)[0])
    torch.testing.assert_close(out["xhat"], t7["xhat"])
    torch.testing.assert_close(out["var_inv"], t7["var_inv"])
    t8 = zoo.exercise8_task()
    b8 = torch.randn(8)
    out = mods[8].forward(t8.inputs["x"], t8.inputs["h0"], t8.inputs["w"], b8)
    torch.testing.assert_close(out["hs"], rnn_forward(t8.inputs["x"], t8.inputs["h0"],
                                                      t8.inputs["w"], b8)[0])


@pytest.mark.parametrize("number", NUMBERS)
def test_problems_are_seeded_and_every_hint_is_a_real_mistake(number):
    """Two builds give the same problem; no recognised mistake equals the right answer on it
    (a constant upstream gradient, or a gain of 1, would make some of them coincide)."""
    a, b = zoo.TASKS[number](), zoo.TASKS[number]()
    for k in a.inputs:
        assert torch.equal(a.inputs[k], b.inputs[k]), k
    for name in a.names:
        for wrong, message in a.alternatives(name, a.ctx):
            assert not approx_equal(wrong, a.ctx.ref[name]), (name, message)


def test_other_numbers_are_refused():
    with pytest.raises(UserError, match="5 to 8"):
        zoo.check_zoo(4, "mine.py")
    with pytest.raises(UserError, match="exercises 1 to 8, not 9"):
        exercises.starter_text(9)


def test_write_starter_refuses_to_overwrite(tmp_path):
    path = exercises.write_starter(6, tmp_path / "six.py")
    assert path.read_text() == exercises.starter_text(6)
    with pytest.raises(UserError, match="already exists"):
        exercises.write_starter(6, path)
    exercises.write_starter(6, path, force=True, solution=True)
    assert path.read_text() == exercises.solution_text(6)


def test_an_error_in_backward_is_reported_with_its_line(tmp_path):
    """dq with k^T instead of k: T != hs, so the matmul cannot run."""
    text = planted(6, "dq = dscores @ k / math.sqrt(hs)",
                   "dq = dscores @ k.transpose(-2, -1) / math.sqrt(hs)")
    path = write(tmp_path, text)
    line = text.splitlines().index("    dq = dscores @ k.transpose(-2, -1) / math.sqrt(hs)") + 1
    result = zoo.check_zoo(6, path)
    assert not result.ok and f"{path}:{line}: RuntimeError in backward()" in result.text


# ---------------------------------------------------------------------------------------------
# classic mistakes: (exercise, planted change, how many times, first wrong tensor, hint words)

LN_DX = ("    dx = rstd / C * (C * dxhat - dxhat.sum(-1, keepdim=True)\n"
         "                     - xhat * (dxhat * xhat).sum(-1, keepdim=True))")
SOFTMAX = "dscores = att * (datt - (att * datt).sum(-1, keepdim=True))"
BN_DX = "dx = gain * var_inv / m * (m * dout - dbias - m / (m - 1) * xhat * dgain)"

MISTAKES = {
    # 5: layer normalisation
    "5 dxhat without weight": (
        5, "dxhat = dout * weight", "dxhat = dout", 1, "dxhat", ["dxhat is dout alone"]),
    "5 dweight from x": (
        5, "dweight = (dout * xhat)", "dweight = (dout * x)", 1, "dweight",
        ["dweight sums dout * x:"]),
    "5 dweight summed over the batch only": (
        5, "dweight = (dout * xhat).sum((0, 1))", "dweight = (dout * xhat).sum(0)", 1,
        "dweight", ["broadcast along dim [0]", "Summing yours over it gives the right answer"]),
    "5 means over the batch": (
        5, "sum(-1, keepdim=True)", "sum(0, keepdim=True)", 2, "dx",
        ["means over dim 0 (the batch)", "over dim -1"]),
    "5 means over the positions, divided by T": (
        5, LN_DX, "    dx = rstd * (dxhat - dxhat.mean(1, keepdim=True)\n"
                  "                 - xhat * (dxhat * xhat).mean(1, keepdim=True))", 1, "dx",
        ["means over dim 1 (the positions)"]),
    "5 the xhat term missing": (
        5, LN_DX, "    dx = rstd * (dxhat - dxhat.mean(-1, keepdim=True))", 1, "dx",
        ["missing its xhat term", "- xhat * mean(dxhat * xhat)"]),
    "5 Bessel in a biased variance": (
        5, "- xhat * (dxhat * xhat)", "- C / (C - 1) * xhat * (dxhat * xhat)", 1, "dx",
        ["C/(C-1) of Bessel", "divides by C"]),
    # 6: causal self-attention
    "6 dv without its transpose": (
        6, "dv = att.transpose(-2, -1) @ dy", "dv = att @ dy", 1, "dv",
        ["missing a transpose", "att^T @ dy"]),
    "6 datt transposed": (
        6, "datt = dy @ v.transpose(-2, -1)", "datt = v @ dy.transpose(-2, -1)", 1, "datt",
        ["transpose of the right answer"]),
    "6 datt masked": (
        6, "datt = dy @ v.transpose(-2, -1)", "datt = (dy @ v.transpose(-2, -1)).tril()", 1,
        "datt", ["datt is zero above the diagonal", "is not masked"]),
    "6 softmax backward skipped": (
        6, SOFTMAX, "dscores = datt", 1, "dscores", ["dscores is datt", "softmax's backward"]),
    "6 softmax backward without its sum": (
        6, SOFTMAX, "dscores = att * datt", 1, "dscores",
        ["dscores is att * datt", "normaliser"]),
    "6 softmax backward without att": (
        6, SOFTMAX, "dscores = datt - (att * datt).sum(-1, keepdim=True)", 1, "dscores",
        ["missing the factor att", "masked positions"]),
    "6 mask forgotten: att recomputed": (
        6, SOFTMAX, "att = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(hs), -1)\n    "
                    + SOFTMAX, 1, "dscores",
        ["nonzero above the diagonal", "recomputed without the mask"]),
    "6 mask forgotten: datt let through": (
        6, SOFTMAX, f"dscores = torch.where(att > 0, {SOFTMAX.split(' = ')[1]}, datt)", 1,
        "dscores", ["nonzero above the diagonal", "on and below the diagonal it is right"]),
    "6 scale in dscores": (
        6, SOFTMAX, SOFTMAX + " / math.sqrt(hs)", 1, "dscores",
        ["1/sqrt(hs) scale in it", "belongs to dq and dk"]),
    "6 dq with dscores^T": (
        6, "dq = dscores @ k", "dq = dscores.transpose(-2, -1) @ k", 1, "dq",
        ["wrong one of dscores and dscores^T", "dq = dscores @ k"]),
    "6 dk without its transpose": (
        6, "dk = dscores.transpose(-2, -1) @ q", "dk = dscores @ q", 1, "dk",
        ["wrong one of dscores and dscores^T", "dk = dscores^T @ q"]),
    "6 dq without the scale": (
        6, "dq = dscores @ k / math.sqrt(hs)", "dq = dscores @ k", 1, "dq",
        ["dq is missing the 1/sqrt(hs) scale"]),
    "6 dk with the scale twice": (
        6, "@ q / math.sqrt(hs)", "@ q / hs", 1, "dk", ["dk has the 1/sqrt(hs) scale twice"]),
    "6 dq times sqrt(hs)": (
        6, "dq = dscores @ k / math.sqrt(hs)", "dq = dscores @ k * math.sqrt(hs)", 1, "dq",
        ["dq multiplies by sqrt(hs)"]),
    # 7: the WaveNet's batchnorm
    "7 dgain per position": (
        7, "dgain = (dout * xhat).sum((0, 1), keepdim=True)",
        "dgain = (dout * xhat).sum(0, keepdim=True)", 1, "dgain",
        ["broadcast along dim [1]", "Summing yours over it gives the right answer"]),
    "7 statistics over dim 0 only": (
        7, BN_DX, "n = x.shape[0]\n    dx = gain * var_inv / n * (n * dout - dout.sum(0, "
                  "keepdim=True) - n / (n - 1) * xhat * (dout * xhat).sum(0, keepdim=True))",
        1, "dx", ["sums over dim 0 only", "per-position statistics"]),
    "7 exercise 3's n for n*T": (
        7, BN_DX, "n = x.shape[0]\n    "
                  "dx = gain * var_inv / n * (n * dout - dbias - n / (n - 1) * xhat * dgain)",
        1, "dx", ["counts n = 4 values per feature where there are m = n*T = 20"]),
    "7 Bessel over n": (
        7, "m / (m - 1)", "x.shape[0] / (x.shape[0] - 1)", 1, "dx",
        ["Bessel's factor over n = 4", "m/(m-1) with m = n*T"]),
    "7 n*T where n*T - 1": (
        7, "m / (m - 1) * ", "", 1, "dx", ["divides by n*T = 20 where the variance divides by "
                                           "n*T - 1 = 19", "Bessel"]),
    "7 gain forgotten": (
        7, "dx = gain * var_inv", "dx = var_inv", 1, "dx", ["missing the factor gain"]),
    # 8: an RNN back through time
    "8 carried gradient not added": (
        8, "(dhs[:, t] + dh)", "dhs[:, t]", 1, "da", ["missing the carried gradient"]),
    "8 tanh derivative 1 - h": (
        8, "(1 - hs[:, t] ** 2)", "(1 - hs[:, t])", 1, "da", ["1 - h_t as the tanh derivative"]),
    "8 tanh derivative from h_{t-1}": (
        8, "(1 - hs[:, t] ** 2)", "(1 - hs[:, t - 1] ** 2)", 1, "da",
        ["from its own output h_t, not h_{t-1}"]),
    "8 carry without its transpose": (
        8, "dh = da[:, t] @ w[C:].T", "dh = da[:, t] @ w[C:]", 1, "da", ["w[C:]^T belongs"]),
    "8 dh0 not summed over the batch": (
        8, "dh0 = (da[:, 0] @ w[C:].T).sum(0)", "dh0 = da[:, 0] @ w[C:].T", 1, "dh0",
        ["broadcast along dim [0]", "Summing yours over it gives the right answer"]),
    "8 dh0 averaged": (
        8, "dh0 = (da[:, 0] @ w[C:].T).sum(0)", "dh0 = (da[:, 0] @ w[C:].T).mean(0)", 1, "dh0",
        ["averaged over the batch"]),
    "8 dw with h_t for h_{t-1}": (
        8, "h_prev = torch.cat([h0.expand(n, 1, -1), hs[:, :-1]], 1)", "h_prev = hs", 1, "dw",
        ["pairs step t's da_t with h_t"]),
}


@pytest.mark.parametrize("case", sorted(MISTAKES))
def test_classic_mistake_is_caught_with_its_hint(case, tmp_path):
    number, old, new, count, wrong, words = MISTAKES[case]
    g = grade(number, write(tmp_path, planted(number, old, new, count)))
    text = g.text()
    assert not g.ok and first_wrong(text) == wrong, text
    rows = {r.name: r.approx for r in g.rows}
    names = zoo.ZOO_NAMES[number]
    assert all(rows[n] for n in names[:names.index(wrong[1:])]), text
    for word in words:
        assert word in text, (word, text)
