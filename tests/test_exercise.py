"""The learner's checker: correct solutions pass, each classic mistake is caught at the right
tensor with the right hint, and a broken file is explained, never crashes the checker."""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from backprop_ninja.checking import atomic
from backprop_ninja.learning import checker
from backprop_ninja.learning import exercises
from backprop_ninja.learning.grading import CheckResult
from backprop_ninja.learning import tasks
from backprop_ninja.cli import main


@pytest.fixture(scope="module")
def setup():
    return atomic.lecture_check_setup()


def write(tmp_path: Path, text: str, name: str = "mine.py") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def planted(number: int, old: str, new: str) -> str:
    """The solution of an exercise with one mistake planted in it."""
    text = exercises.solution_text(number)
    assert text.count(old) == 1, old
    return text.replace(old, new)


def check(number: int, path: Path, setup, names=None) -> CheckResult:
    return checker.check(number, path, setup=setup, data=names)


def first_wrong(result: CheckResult) -> str:
    line = next(l for l in result.text.splitlines() if l.startswith("first wrong:"))
    return line.split()[2]


def count_blanks(text: str) -> int:
    return len(re.findall(r"^\s+d\w+ = None  # TODO: ", text, flags=re.M))


def fenced_answers(template: str) -> list[list[str]]:
    """The stripped lines between each '# BLANK ...' and its '# END', one list per blank."""
    answers, inside = [], False
    for line in template.splitlines():
        if line.strip().startswith("# BLANK "):
            answers.append([])
            inside = True
        elif line.strip() == "# END":
            inside = False
        elif inside and line.strip():
            answers[-1].append(line.strip())
    return answers


def import_file(path: Path):
    spec = importlib.util.spec_from_file_location("learner_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------
# templates

@pytest.mark.parametrize("number", [1, 2, 3])
def test_solution_passes(number, tmp_path, setup):
    result = check(number, write(tmp_path, exercises.solution_text(number)), setup)
    assert result.ok, result.text
    assert "all correct" in result.text and "first wrong" not in result.text
    assert "note:" not in result.text


def test_exercise4_solution_passes_and_trains(tmp_path, setup, names):
    result = check(4, write(tmp_path, exercises.solution_text(4)), setup, names)
    assert result.ok, result.text
    assert "7/7 gradients match autograd" in result.text
    assert "your gradients train the network" in result.text


@pytest.mark.parametrize("number", [1, 2, 3, 4])
def test_starter_has_blanks_not_answers(number):
    starter, solution = exercises.starter_text(number), exercises.solution_text(number)
    n_blanks = exercises.template_text(number).count("# BLANK ")
    assert count_blanks(starter) == n_blanks >= 1
    assert "# BLANK" not in starter + solution and "# END" not in starter + solution
    assert count_blanks(solution) == 0
    # each blank's answer, read off the template's fences: in the solution, no line of it in the starter
    answers = fenced_answers(exercises.template_text(number))
    assert len(answers) == n_blanks and all(answers), answers
    starter_lines = {l.strip() for l in starter.splitlines()}
    solution_lines = {l.strip() for l in solution.splitlines()}
    for answer in answers:
        assert all(l in solution_lines for l in answer), answer
        assert not [l for l in answer if l in starter_lines], answer


def test_exercise1_starter_has_one_blank_per_gradient():
    blanks = count_blanks(exercises.starter_text(1))
    assert blanks == len(atomic.EXERCISE1_NAMES) == 26


def test_template_forwards_are_the_checkers(tmp_path, setup):
    s = setup
    mod1 = import_file(write(tmp_path, exercises.solution_text(1), "one.py"))
    ours, theirs = atomic.atomic_forward(s.params, s.Xb, s.Yb), mod1.forward(s.params, s.Xb, s.Yb)
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), k
    mod4 = import_file(write(tmp_path, exercises.solution_text(4), "four.py"))
    ours, theirs = tasks.exercise4_forward(s.params, s.Xb, s.Yb), mod4.forward(s.params, s.Xb, s.Yb)
    assert ours.keys() == theirs.keys()
    for k in ours:  # the model's forward takes its batch statistics from var_mean: float noise
        assert ours[k].shape == theirs[k].shape, k
        torch.testing.assert_close(ours[k], theirs[k], rtol=1e-5, atol=1e-6)


def test_starter_grades_as_not_filled_in(tmp_path, setup):
    path = write(tmp_path, exercises.starter_text(1))
    result = check(1, path, setup)
    assert not result.ok and first_wrong(result) == "dlogprobs"
    line = exercises.starter_text(1).splitlines().index(
        next(l for l in exercises.starter_text(1).splitlines() if l.strip().startswith("dlogprobs = None"))) + 1
    assert f"dlogprobs is still None: fill in the blank at line {line}" in result.text


def test_partly_filled_starter_points_at_the_next_blank(tmp_path, setup):
    text = exercises.starter_text(1).replace(
        "dlogprobs = None  # TODO: loss = -logprobs[range(n), Yb].mean()",
        "dlogprobs = torch.zeros_like(logprobs)\n"
        "    dlogprobs[torch.arange(n), Yb] = -1.0 / n")
    result = check(1, write(tmp_path, text), setup)
    assert first_wrong(result) == "dprobs" and "1/26 gradients match" in result.text


def test_exercise4_blank_points_at_the_first_blank_above(tmp_path, setup, names):
    result = check(4, write(tmp_path, exercises.starter_text(4)), setup, names)
    assert not result.ok and first_wrong(result) == "dW2"
    assert "after the first blank above it, dlogits" in result.text
    assert "training run waits" in result.text


# ---------------------------------------------------------------------------------------------
# classic mistakes: (exercise, planted change, first wrong tensor, words of the hint)

MISTAKES = {
    "keepdim dropped (1-D instead of n x 1)": (
        1, "dcounts_sum_inv = (counts * dprobs).sum(1, keepdim=True)",
        "dcounts_sum_inv = (counts * dprobs).sum(1)",
        None, ["before that line, dcounts_sum_inv was already wrong",
               "has shape [32] but counts_sum_inv is [32, 1]", "keepdim=True",
               "(the values are right)"]),
    "keepdim dropped on a parameter": (
        1, "dbnbias = dhpreact.sum(0, keepdim=True)", "dbnbias = dhpreact.sum(0)",
        "dbnbias", ["has shape [64] but bnbias is [1, 64]", "keepdim=True"]),
    "sum over the broadcast dim missing": (
        1, "dbngain = (bnraw * dhpreact).sum(0, keepdim=True)", "dbngain = bnraw * dhpreact",
        "dbngain", ["the shape of the broadcast result", "broadcast along dim [0]",
                    "Summing yours over it gives the right answer"]),
    "sum missing for a 1-D bias": (
        1, "db2 = dlogits.sum(0)", "db2 = dlogits",
        "db2", ["shape of the broadcast result", "Summing yours over it gives the right answer"]),
    "counts overwritten by its second branch": (
        1, "dcounts += torch.ones_like(counts) * dcounts_sum",
        "dcounts = torch.ones_like(counts) * dcounts_sum",
        "dcounts", ["only the gradient through counts_sum", "also feeds probs", "(+=)"]),
    "counts second branch forgotten": (
        1, "dcounts += torch.ones_like(counts) * dcounts_sum", "pass",
        "dcounts", ["only the gradient through probs", "also feeds counts_sum"]),
    "bndiff overwritten": (
        1, "dbndiff += 2 * bndiff * dbndiff2", "dbndiff = 2 * bndiff * dbndiff2",
        "dbndiff", ["only the gradient through bndiff2", "also feeds bnraw"]),
    "hprebn overwritten": (
        1, "dhprebn += 1.0 / n * torch.ones_like(hprebn) * dbnmeani",
        "dhprebn = 1.0 / n * torch.ones_like(hprebn) * dbnmeani",
        "dhprebn", ["only the gradient through bnmeani", "also feeds bndiff"]),
    "logits overwritten by the max branch": (
        1, "dlogits += F.one_hot", "dlogits = F.one_hot",
        "dlogits", ["only the gradient through logit_maxes", "also feeds norm_logits"]),
    "transpose missing: shape": (
        1, "dW2 = h.T @ dlogits", "dW2 = dlogits.T @ h",
        "dW2", ["the transpose of [64, 27]", "dW = x.T @ dout"]),
    "transpose missing: crash in the matmul": (
        1, "dh = dlogits @ W2.T", "dh = dlogits @ W2",
        None, ["RuntimeError in backward()", "dh = dlogits @ W2", "a matmul backward is a matmul "
                                                                   "with a transpose"]),
    "Bessel: 1/n where 1/(n-1)": (
        1, "dbndiff2 = 1.0 / (n - 1) *", "dbndiff2 = 1.0 / n *",
        "dbndiff2", ["n and n-1", "Bessel"]),
    "all zeros": (
        1, "dprobs = (1.0 / probs) * dlogprobs", "dprobs = torch.zeros_like(probs)",
        "dprobs", ["all zeros"]),
    "sign flipped": (
        1, "dlogprobs[torch.arange(n), Yb] = -1.0 / n", "dlogprobs[torch.arange(n), Yb] = 1.0 / n",
        "dlogprobs", ["times -1", "sign is flipped"]),
    "embedding rows assigned, not accumulated": (
        1, "dC[Xb[k, j]] += demb[k, j]", "dC[Xb[k, j]] = demb[k, j]",
        "dC", ["looked up several times", "index_add_"]),
    "fused cross-entropy without the 1/n": (
        2, "    dlogits /= n\n", "",
        "dlogits", ["times 32", "mean over the batch"]),
    "fused cross-entropy without the -1": (
        2, "    dlogits[torch.arange(n), Yb] -= 1\n", "",
        "dlogits", ["softmax / n", "-1"]),
    "fused batchnorm: n where n/(n-1)": (
        3, "n / (n - 1) * bnraw", "bnraw",
        "dhprebn", ["n/(n-1)", "Bessel"]),
    "fused batchnorm without the gain": (
        3, "dhprebn = bngain * bnvar_inv / n", "dhprebn = bnvar_inv / n",
        "dhprebn", ["missing the factor bngain"]),
    "fused cross-entropy all zeros": (
        2, 'return {"logits": dlogits}', 'return {"logits": torch.zeros_like(dlogits)}',
        "dlogits", ["all zeros"]),
}


@pytest.mark.parametrize("case", list(MISTAKES), ids=list(MISTAKES))
def test_classic_mistake_is_named(case, tmp_path, setup):
    number, old, new, wrong, words = MISTAKES[case]
    result = check(number, write(tmp_path, planted(number, old, new)), setup)
    assert not result.ok, result.text
    if wrong is None:  # a crash, explained
        assert "Traceback" not in result.text
    else:
        assert first_wrong(result) == wrong, result.text
    for w in words:
        assert w in result.text, (w, result.text)


def test_rows_before_the_first_wrong_pass(tmp_path, setup):
    path = write(tmp_path, planted(1, "dbndiff += 2 * bndiff * dbndiff2",
                                   "dbndiff = 2 * bndiff * dbndiff2"))
    result = check(1, path, setup)
    rows = result.text.splitlines()[2:28]
    names = [r.split("|")[0].strip() for r in rows]
    assert names == list(atomic.EXERCISE1_NAMES)
    k = names.index("bndiff")
    assert all("True" in r.split("|")[2] for r in rows[:k])
    assert "False" in rows[k].split("|")[2]


def test_missing_max_branch_passes_with_a_note(tmp_path, setup):
    path = write(tmp_path, planted(1, "    dlogits += F.one_hot(logits.max(1).indices, "
                                      "num_classes=logits.shape[1]) * dlogit_maxes\n", ""))
    result = check(1, path, setup)
    assert result.ok, result.text
    assert "note: dlogits equals dnorm_logits exactly" in result.text


def test_exercise4_bessel_mistake_named_at_W1(tmp_path, setup, names):
    path = write(tmp_path, planted(4, "n / (n - 1) * bnraw", "bnraw"))
    result = check(4, path, setup, names)
    assert not result.ok and first_wrong(result) == "dW1"
    assert "n/(n-1)" in result.text and "training run waits" in result.text


def test_exercise4_transposed_dW2(tmp_path, setup, names):
    path = write(tmp_path, planted(4, "dW2 = h.T @ dlogits", "dW2 = dlogits.T @ h"))
    result = check(4, path, setup, names)
    assert first_wrong(result) == "dW2" and "transpose" in result.text


def test_exercise4_gradients_that_do_not_train_fail(tmp_path, setup, names):
    # right on the check batch (its targets) and wrong on any other
    path = write(tmp_path, planted(4, "    dlogits /= n\n",
                                   "    dlogits /= n\n    dlogits *= float(Yb.sum() == 400)\n"))
    fixed_sum = int(setup.Yb.sum())
    text = path.read_text().replace("== 400", f"== {fixed_sum}")
    path.write_text(text)
    result = check(4, path, setup, names)
    assert not result.ok and "does not fall like the reference" in result.text, result.text
    assert "7/7 gradients match autograd" in result.text


# ---------------------------------------------------------------------------------------------
# broken files: explained with a line number, never a traceback of the checker

def cli_check(number: int, path: Path, capsys) -> tuple[int, str]:
    """The command, as the learner runs it (the check runs in a child process: seconds each)."""
    code = main(["exercise", str(number), "--check", str(path)])
    captured = capsys.readouterr()
    out = captured.out + captured.err
    assert "Traceback" not in out
    return code, out


def graded(number: int, path: Path, capsys) -> tuple[int, str]:
    """The command's exit code and text, graded in this process: the text is the command's,
    character for character (test_checker_process proves it), without a child's start-up."""
    result = checker.check(number, path)
    out = result.text + capsys.readouterr().out
    assert "Traceback" not in out
    return (0 if result.ok else 1), out


def test_syntax_error_names_its_line(tmp_path, capsys):
    path = write(tmp_path, "import torch\n\ndef backward(logits, Yb):\n    return {'logits': (}\n")
    code, out = cli_check(2, path, capsys)
    assert code == 1 and f"{path}:4: SyntaxError" in out


def test_exception_in_backward_names_its_line(tmp_path, capsys):
    text = planted(2, "dlogits /= n", "dlogits /= n\n    dlogits = dlogits[:, 100] + 1")
    line = text.splitlines().index("    dlogits = dlogits[:, 100] + 1") + 1
    code, out = graded(2, write(tmp_path, text), capsys)
    assert code == 1 and f"mine.py:{line}: IndexError in backward()" in out
    assert "dlogits[:, 100]" in out


def test_exception_at_import_names_its_line(tmp_path, capsys):
    path = write(tmp_path, "import torch\nx = 1\nraise ValueError('oops')\n")
    code, out = graded(3, path, capsys)
    assert code == 1 and "mine.py:3: ValueError while importing the file: oops" in out


def test_wrong_return_type(tmp_path, capsys):
    path = write(tmp_path, "def backward(logits, Yb):\n    return logits\n")
    code, out = graded(2, path, capsys)
    assert code == 1 and "returned Tensor, expected a dict" in out and "mine.py:1" in out


def test_missing_function(tmp_path, capsys):
    path = write(tmp_path, "def backwards(logits, Yb):\n    return {}\n")
    code, out = graded(2, path, capsys)
    assert code == 1 and "has no function backward(...)" in out


def test_keys_with_a_d_are_explained(tmp_path, capsys):
    text = planted(2, 'return {"logits": dlogits}', 'return {"dlogits": dlogits}')
    code, out = graded(2, write(tmp_path, text), capsys)
    assert code == 1 and "the returned dict has 'dlogits'" in out and "'logits'" in out


def test_not_a_tensor(tmp_path, capsys):
    text = planted(2, 'return {"logits": dlogits}', 'return {"logits": dlogits.tolist()}')
    code, out = graded(2, write(tmp_path, text), capsys)
    assert code == 1 and "dlogits is a list, not a torch tensor" in out


def test_blanks_left_as_none(tmp_path, capsys):
    path = write(tmp_path, exercises.starter_text(3))
    code, out = graded(3, path, capsys)
    assert code == 1 and "dhprebn is still None: fill in the blank at line" in out


def test_using_a_none_blank_is_explained(tmp_path, capsys):
    text = exercises.starter_text(1).replace("dprobs = None", "dprobs = (1.0 / probs) * dlogprobs")
    code, out = graded(1, write(tmp_path, text), capsys)
    assert code == 1 and "TypeError in backward()" in out and "still None" in out


@pytest.mark.parametrize("cheat", [
    "loss = F.cross_entropy(x, Yb)\n    loss.backward()\n    return {'logits': x.grad}",
    "loss = F.cross_entropy(x, Yb)\n    return {'logits': torch.autograd.grad(loss, x)[0]}",
    "return {'logits': F.softmax(x, 1)}",
])
def test_autograd_is_refused(cheat, tmp_path, capsys):
    text = ("import torch\nimport torch.nn.functional as F\n\ndef backward(logits, Yb):\n"
            f"    x = logits.clone().requires_grad_()\n    {cheat}\n")
    code, out = graded(2, write(tmp_path, text), capsys)
    assert code == 1 and "autograd" in out


def test_missing_file_is_a_one_line_error(tmp_path, capsys):
    code = main(["exercise", "1", "--check", str(tmp_path / "nope.py")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "--init" in err


# ---------------------------------------------------------------------------------------------
# --init and --show-solution

def test_init_writes_a_file_that_imports_and_runs(tmp_path, capsys, setup):
    path = tmp_path / "ex1.py"
    assert main(["exercise", "1", "--init", str(path)]) == 0
    assert f"backprop-ninja exercise 1 --check {path}" in capsys.readouterr().out
    module = import_file(path)
    values = module.forward(setup.params, setup.Xb, setup.Yb)
    got = module.backward(Xb=setup.Xb, Yb=setup.Yb, **setup.params, **values)
    assert set(got) == set(atomic.EXERCISE1_NAMES) and all(v is None for v in got.values())


def test_running_the_starter_runs_the_checker(tmp_path):
    path = tmp_path / "ex2.py"
    assert main(["exercise", "2", "--init", str(path)]) == 0
    proc = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "dlogits is still None" in proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr


def test_init_refuses_to_overwrite(tmp_path, capsys):
    path = write(tmp_path, "my work\n")
    assert main(["exercise", "2", "--init", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "already exists" in err and "--force" in err
    assert path.read_text() == "my work\n"
    assert main(["exercise", "2", "--init", str(path), "--force"]) == 0
    assert path.read_text() == exercises.starter_text(2)


def test_show_solution_prints_the_solution(capsys):
    assert main(["exercise", "3", "--show-solution"]) == 0
    out = capsys.readouterr().out
    assert out == exercises.solution_text(3) and "n / (n - 1)" in out


def test_check_never_prints_the_solution(tmp_path, capsys, setup):
    code, out = graded(1, write(tmp_path, exercises.starter_text(1)), capsys)
    assert code == 1 and "dlogprobs is still None" in out
    assert "h.T @ dlogits" not in out and "index_add_" not in out
    code, out = graded(1, write(tmp_path, planted(1, "dW2 = h.T @ dlogits", "dW2 = dlogits.T @ h")), capsys)
    assert code == 1 and "first wrong: dW2" in out and "transpose" in out
    assert "h.T @ dlogits" not in out and "index_add_" not in out


def test_sys_exit_at_import_does_not_end_the_checker(tmp_path, capsys):
    path = write(tmp_path, "import sys\nsys.exit('bye')\n")
    code, out = cli_check(2, path, capsys)
    assert code == 1 and "mine.py:2: SystemExit while importing the file" in out


def test_exercise4_shapes_that_break_on_other_batches(tmp_path, setup, names):
    # right on the check batch (32 rows), a wrong shape on every other batch size
    text = planted(4, "db2 = dlogits.sum(0)", "db2 = dlogits.sum(0) if Yb.sum() == 400 else dlogits")
    path = write(tmp_path, text.replace("== 400", f"== {int(setup.Yb.sum())}"))
    result = check(4, path, setup, names)
    assert not result.ok and "during training, backward() returned no gradient of b2's" in result.text


def test_os_exit_does_not_end_the_checker(tmp_path, capsys):
    at_import = write(tmp_path, "import os\nos._exit(0)\n", "at_import.py")
    code, out = cli_check(2, at_import, capsys)
    assert code == 1 and "at_import.py:2: SystemExit while importing the file" in out
    in_backward = write(tmp_path, "import os\n\ndef backward(logits, Yb):\n    os._exit(0)\n", "in_call.py")
    code, out = cli_check(2, in_backward, capsys)
    assert code == 1 and "in_call.py:4: SystemExit in backward()" in out


# ---------------------------------------------------------------------------------------------
# what --init writes and --check loads agree; another exercise's file; running without torch

def test_init_refuses_what_check_cannot_load(tmp_path, capsys):
    path = tmp_path / "ex1.txt"
    assert main(["exercise", "1", "--init", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and ".py file or a .ipynb notebook" in err and not path.exists()
    path.write_text(exercises.solution_text(1))
    assert main(["exercise", "1", "--check", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "are .py (a Python file) or .ipynb (a notebook)" in err


def test_another_exercises_file_is_named(tmp_path, capsys):
    path = write(tmp_path, exercises.starter_text(1), "ex1.py")
    code, out = cli_check(2, path, capsys)
    assert code == 1 and out.splitlines()[1:] == [
        f"{path} is exercise 1's file (its backward takes exercise 1's arguments); check it "
        f"with: backprop-ninja exercise 1 --check {path}"]


@pytest.mark.parametrize("number", [1, 3])
def test_running_the_starter_without_torch_says_how(number, tmp_path):
    """python -S: a Python without the project's packages, as the system's usually is."""
    path = tmp_path / f"ex{number}.py"
    path.write_text(exercises.starter_text(number))
    proc = subprocess.run([sys.executable, "-S", str(path)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f".venv/bin/backprop-ninja exercise {number} --check {path}" in proc.stderr
