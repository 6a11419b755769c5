"""``exercise N --check`` runs the learner's code in a child process: a normal run prints exactly
the in-process check's text; a loop that never ends, a crash or a runaway allocation is one line
and never hangs the checker; a flood of prints is cut short."""

import time
from pathlib import Path

import nbformat
import pytest

from backprop_ninja.cli import main
from backprop_ninja.learning import checker
from backprop_ninja.learning import exercises
from backprop_ninja.learning import sandbox
from backprop_ninja.learning import notebook_build

TIMEOUT = 3  # seconds: the tests' --timeout


def cli(capsys, *args: str) -> tuple[int, str]:
    code = main(["exercise", *args])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    return code, captured.out + captured.err


def write(tmp_path: Path, text: str, name: str = "mine.py") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def notebook_with(tmp_path: Path, number: int, blank: str, source: str) -> Path:
    nb = notebook_build.notebook(number, solution=True)
    cell = next(c for c in nb.cells if c.metadata.get("backprop_ninja", {}).get("name") == blank)
    cell.source = source
    return write(tmp_path, nbformat.writes(nb), "mine.ipynb")


# ---------------------------------------------------------------------------------------------
# a normal run: the same text as in this process

def test_child_prints_exactly_the_in_process_text(tmp_path, capsys):
    path = write(tmp_path, exercises.solution_text(1).replace("dW2 = h.T @ dlogits", "dW2 = dlogits.T @ h"))
    code, out = cli(capsys, "1", "--check", str(path))
    assert code == 1 and out == checker.check(1, path).text + "\n"


@pytest.mark.parametrize("solution, code, words", [
    (True, 0, "all correct: well done"),
    (False, 1, "dlogits is still None: fill in its cell (cell "),
])
def test_check_a_saved_notebook(solution, code, words, tmp_path, capsys):
    path = tmp_path / "ex2.ipynb"
    args = ["2", "--init", str(path)] + (["--show-solution"] if solution else [])
    assert cli(capsys, *args)[0] == 0
    got, out = cli(capsys, "2", "--check", str(path))
    assert got == code and words in out and out == checker.check(2, path).text + "\n"


# ---------------------------------------------------------------------------------------------
# what cannot be graded: one line, in bounded time

def test_endless_loop_in_a_file_stops_at_the_time_limit(tmp_path, capsys):
    # the loop on one line: the time limit may stop it at either line of a two-line loop
    text = "import torch\n\ndef backward(logits, Yb):\n    while True: pass\n"
    path = write(tmp_path, text)
    start = time.monotonic()
    code, out = cli(capsys, "2", "--check", str(path), "--timeout", str(TIMEOUT))
    took = time.monotonic() - start
    assert code == 1 and out == (f"{path}:4: stopped after {TIMEOUT} s (the time limit; "
                                 "--timeout to change it): look for a loop that never ends\n")
    assert took < TIMEOUT + 15  # python and torch start in the child; the hard kill is later


def test_endless_loop_in_a_notebook_cell_stops_at_the_time_limit(tmp_path, capsys):
    path = notebook_with(tmp_path, 2, "dlogits", "x = 0\nwhile True: x += 1")  # one line: see above
    code, out = cli(capsys, "2", "--check", str(path), "--timeout", str(TIMEOUT))
    assert code == 1 and out.count("\n") == 1
    assert out.startswith(f"{path}, cell ")
    assert f"(dlogits), line 2: stopped after {TIMEOUT} s (the time limit" in out


@pytest.mark.parametrize("text, line, words", [
    ("import ctypes\n\ndef backward(logits, Yb):\n    ctypes.string_at(0)\n", 4,
     "SIGSEGV, a segmentation fault"),
    ("import os\nos.abort()\n", 2, "SIGABRT, an abort"),
])
def test_crash_is_one_line(text, line, words, tmp_path, capsys):
    path = write(tmp_path, text)
    code, out = cli(capsys, "2", "--check", str(path))
    assert code == 1 and out.count("\n") == 1
    assert out.startswith(f"{path}:{line}: the check crashed while running your code: {words}")


def test_runaway_allocation_is_one_line(tmp_path):
    path = write(tmp_path, "import torch\n\nbig = torch.ones(2 ** 28)  # 1 GiB\n")
    result = sandbox.check_in_child(2, path, memory=256 * 2**20)
    assert not result.ok and result.output == ""
    assert result.text.splitlines()[1:] == [
        f"{path}:3: ran out of memory while importing the file (the check lets your code use "
        "0.25 GiB): look for a tensor far bigger than the batch's, or one that grows in a loop"]


def test_ten_megabytes_of_prints_are_cut(tmp_path, capsys):
    path = notebook_with(tmp_path, 2, "dlogits", exercises.template_parts(2).blanks[0].answer +
                         "\nfor _ in range(100_000):\n    print('x' * 99)")
    code, out = cli(capsys, "2", "--check", str(path))
    assert code == 0 and out.endswith("all correct: well done\n")
    assert len(out) < sandbox.OUTPUT_LIMIT + 1000
    cut = [line for line in out.splitlines() if "more output cut" in line]
    assert cut == ["[10.0 MB more output cut: print less, e.g. a tensor's .shape instead of the "
                   "tensor]"]


# ---------------------------------------------------------------------------------------------
# the flags

@pytest.mark.parametrize("args, words", [
    (["--check", "x.py", "--timeout", "0"], "--timeout must be a number of seconds above 0"),
    (["--init", "x.py", "--timeout", "5"], "--timeout only goes with --check FILE"),
    (["--check", "x.py", "--show-solution"], "does not go with --check"),
    ([], "say what to do"),
])
def test_flag_mistakes_are_one_line(args, words, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out = cli(capsys, "2", *args)
    assert code == 2 and out.count("\n") == 1 and words in out


def test_init_with_show_solution_writes_the_solved_file(tmp_path, capsys):
    py, nb = tmp_path / "s.py", tmp_path / "s.ipynb"
    assert cli(capsys, "3", "--init", str(py), "--show-solution")[0] == 0
    assert py.read_text() == exercises.solution_text(3)
    assert cli(capsys, "3", "--init", str(nb), "--show-solution")[0] == 0
    assert nbformat.reads(nb.read_text(), 4) == notebook_build.notebook(3, solution=True)
    code, out = cli(capsys, "3", "--init", str(nb))
    assert code == 2 and "already exists" in out and out.count("\n") == 1
