"""A grade means the learner wrote the gradients: each way around that the checker once graded
"all correct" is now refused with one line, through the command (the child process) and, for
notebooks, headless and in a Jupyter kernel. The verdict is the checker's, never the child's."""

from pathlib import Path

import nbformat
import pytest

from backprop_ninja.cli import main
from backprop_ninja.learning import exercises, notebook_build

TITLE = exercises.TITLES[2]
AUTOGRAD = ("AutogradUsed in backward(): autograd was used (backward/grad or a tensor that "
            "requires grad); compute every gradient by hand with plain tensor ops")

CHEATS = {
    "the package's solution": ('''\
def backward(logits, Yb):
    from backprop_ninja.learning.templates import exercise1
    return exercise1.backward(logits, Yb)
''', 2, "ImportRefused in backward(): import of backprop_ninja.learning.templates refused: while "
        "the check runs your code, the package's own modules (its solutions among them) are off "
        "limits; compute the gradients yourself"),
    "the solution imported at the top": ('''\
from backprop_ninja.learning.templates.exercise2 import backward
''', 1, "ImportRefused while importing the file: import of "
        "backprop_ninja.learning.templates.exercise2 refused"),
    "forward-mode AD": ('''\
import torch
import torch.nn.functional as F


def backward(logits, Yb):
    return {"logits": torch.func.jacfwd(lambda l: F.cross_entropy(l, Yb))(logits)}
''', 6, AUTOGRAD),
    "autograd in a thread, grad captured at import": ('''\
import threading

import torch.nn.functional as F
from torch.autograd import grad


def backward(logits, Yb):
    out = {}

    def work():
        x = logits.clone().requires_grad_()
        out["logits"] = grad(F.cross_entropy(x, Yb), x)[0]

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    return out
''', 12, AUTOGRAD),
    "autograd in a subprocess": ('''\
import subprocess
import sys


def backward(logits, Yb):
    subprocess.run([sys.executable, "-c", "print('autograd would run here')"], check=True)
    return {}
''', 6, "ProcessRefused in backward(): starting a program refused"),
    "a signal to the checker": ('''\
import os


def backward(logits, Yb):
    os.kill(os.getppid(), 9)
''', 5, "ProcessRefused in backward(): os.kill("),
}


def check(capsys, path: Path, number: int = 2) -> tuple[int, list[str]]:
    code = main(["exercise", str(number), "--check", str(path)])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    return code, captured.out.splitlines()


@pytest.mark.parametrize("cheat", CHEATS)
def test_cheat_is_refused_in_one_line(cheat, tmp_path, capsys):
    text, line, words = CHEATS[cheat]
    path = tmp_path / "mine.py"
    path.write_text(text)
    code, out = check(capsys, path)
    assert code == 1 and len(out) == 2 and out[0] == TITLE, out
    assert out[1].startswith(f"{path}:{line}: {words}"), out


def test_a_forged_result_and_a_kill_is_not_a_pass(tmp_path, capsys, monkeypatch):
    """The child once left a verdict in result.json, whose path was in its argv; the checker
    trusted the file whenever it existed."""
    monkeypatch.chdir(tmp_path)  # what it writes lands here
    path = tmp_path / "mine.py"
    path.write_text('''\
import json
import os
import sys

for argument in sys.argv[1:]:
    try:
        with open(argument, "w") as f:
            json.dump({"ok": True, "text": "all correct: well done"}, f)
    except OSError:
        pass
os.kill(os.getpid(), 9)
''')
    code, out = check(capsys, path)
    assert code == 1 and out == [f"{path}: the check was killed by signal 9 (SIGKILL), from "
                                 "outside the checker or by your code (os.kill?)"]


def test_killing_the_parent_around_python_leaves_the_checker_standing(tmp_path, capsys):
    path = tmp_path / "mine.py"
    path.write_text("import ctypes\nimport os\n\nctypes.CDLL(None).kill(os.getppid(), 9)\n")
    code, out = check(capsys, path)
    assert code == 1 and out == [f"{path}: your code killed the process that ran it (a signal to "
                                 "its parent?); the check survived it, but your code must not "
                                 "signal other processes"]


# ---------------------------------------------------------------------------------------------
# notebooks: the same guard headless and in Jupyter

AUTOGRAD_CELL = ("x = logits.clone().requires_grad_()\n"
                 "dlogits = torch.autograd.grad(F.cross_entropy(x, Yb), x)[0]")
CELL_WORDS = ("AutogradUsed while running the cell: autograd was used (backward/grad or a tensor "
              "that requires grad)")


def autograd_notebook():
    nb = notebook_build.notebook(2, solution=True)
    cell = next(c for c in nb.cells if c.metadata.get("backprop_ninja", {}).get("name") == "dlogits")
    cell.source = AUTOGRAD_CELL
    return nb


def test_autograd_in_a_notebook_cell_is_refused_headless(tmp_path, capsys):
    path = tmp_path / "mine.ipynb"
    path.write_text(nbformat.writes(autograd_notebook()))
    code, out = check(capsys, path)
    assert code == 1 and len(out) == 2 and out[0] == TITLE
    assert out[1].startswith(f"{path}, cell ") and CELL_WORDS in out[1], out


def test_autograd_in_a_notebook_cell_is_refused_in_jupyter():
    """The cell runs (autograd is there in Jupyter); the check cell runs it again under the guard
    and refuses it, as --check does."""
    from nbclient import NotebookClient

    nb = autograd_notebook()
    NotebookClient(nb, timeout=120, kernel_name="python3").execute()
    (output,) = nb.cells[-1].outputs
    text = output.data["text/plain"].splitlines()
    assert text[0] == TITLE and len(text) == 2, text
    assert text[1].startswith("Cell In[") and CELL_WORDS in text[1], text
