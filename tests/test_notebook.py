"""The exercises as notebooks: built from the .py templates, executed in a real kernel (solved
ones pass, starters fail readably), graded headless like their check cell, and every broken
notebook explained in one line."""

import json
import re

import nbformat
import pytest
import torch

from backprop_ninja.checking import atomic
from backprop_ninja.learning import checker
from backprop_ninja.learning import exercises
from backprop_ninja.learning.grading import CheckResult
from backprop_ninja.learning import notebook, notebook_build

# The lecture's exercise-1 answer as the video types it, one statement per gradient (its order,
# its spellings: range(n), no keepdim on dbnmeani). Every value is right; dbnmeani's shape is not.
LECTURE_EXERCISE1 = """\
dlogprobs = torch.zeros_like(logprobs)
dlogprobs[range(n), Yb] = -1.0/n
dprobs = (1.0 / probs) * dlogprobs
dcounts_sum_inv = (counts * dprobs).sum(1, keepdim=True)
dcounts = counts_sum_inv * dprobs
dcounts_sum = (-counts_sum**-2) * dcounts_sum_inv
dcounts += torch.ones_like(counts) * dcounts_sum
dnorm_logits = counts * dcounts
dlogits = dnorm_logits.clone()
dlogit_maxes = (-dnorm_logits).sum(1, keepdim=True)
dlogits += F.one_hot(logits.max(1).indices, num_classes=logits.shape[1]) * dlogit_maxes
dh = dlogits @ W2.T
dW2 = h.T @ dlogits
db2 = dlogits.sum(0)
dhpreact = (1.0 - h**2) * dh
dbngain = (bnraw * dhpreact).sum(0, keepdim=True)
dbnraw = bngain * dhpreact
dbnbias = dhpreact.sum(0, keepdim=True)
dbndiff = bnvar_inv * dbnraw
dbnvar_inv = (bndiff * dbnraw).sum(0, keepdim=True)
dbnvar = (-0.5*(bnvar + 1e-5)**-1.5) * dbnvar_inv
dbndiff2 = (1.0/(n-1))*torch.ones_like(bndiff2) * dbnvar
dbndiff += (2*bndiff) * dbndiff2
dhprebn = dbndiff.clone()
dbnmeani = (-dbndiff).sum(0)
dhprebn += 1.0/n * (torch.ones_like(hprebn) * dbnmeani)
dembcat = dhprebn @ W1.T
dW1 = embcat.T @ dhprebn
db1 = dhprebn.sum(0)
demb = dembcat.view(emb.shape)
dC = torch.zeros_like(C)
for k in range(Xb.shape[0]):
  for j in range(Xb.shape[1]):
    ix = Xb[k,j]
    dC[ix] += demb[k,j]
"""


@pytest.fixture(scope="module")
def setup():
    return atomic.lecture_check_setup()


def blank_cells(nb) -> list:
    return [c for c in nb.cells if c.metadata.get("backprop_ninja", {}).get("role") == "blank"]


def cell_of(nb, role: str, name: str | None = None):
    for c in nb.cells:
        meta = c.metadata.get("backprop_ninja", {})
        if meta.get("role") == role and meta.get("name") == name:
            return c
    raise KeyError(role, name)


def save(nb, tmp_path, name: str = "mine.ipynb"):
    path = tmp_path / name
    path.write_text(nbformat.writes(nb))
    return path


def with_cell(number: int, name: str, source: str, solution: bool = True):
    """The exercise's notebook with one blank cell's source replaced."""
    nb = notebook_build.notebook(number, solution)
    cell_of(nb, "blank", name).source = source
    return nb


def lecture_notebook():
    """Exercise 1's starter with the lecture's lines typed into the cells of their gradients."""
    nb = notebook_build.notebook(1)
    by_cell: dict[str, list[str]] = {}
    current = None
    for line in LECTURE_EXERCISE1.splitlines():
        match = re.match(r"(d\w+)\b", line)
        current = match.group(1) if match and not line.startswith(" ") else current
        by_cell.setdefault(current, []).append(line)
    for name, lines in by_cell.items():
        cell_of(nb, "blank", name).source = "\n".join(lines)
    return nb


def report_lines(result: CheckResult, number: int) -> list[str]:
    """The lines of a failed check under the exercise's title (which every check prints)."""
    lines = result.text.splitlines()
    assert lines[0] == exercises.TITLES[number], result.text
    return lines[1:]


# ---------------------------------------------------------------------------------------------
# building: one source, the .py template

@pytest.mark.parametrize("number", [1, 2, 3, 4])
def test_notebook_is_valid_and_built_from_the_template(number):
    starter, solved = notebook_build.notebook(number), notebook_build.notebook(number, solution=True)
    for nb in (starter, solved):
        nbformat.validate(nb)
        assert nb.metadata["backprop_ninja"]["exercise"] == number
        assert nb.metadata["kernelspec"]["name"] == "python3"
    parts = exercises.template_parts(number)
    setup_cell = cell_of(starter, "setup").source
    assert parts.forward in setup_cell and f"exercise_inputs({number})" in setup_cell
    starter_blanks = [l.strip() for l in exercises.starter_text(number).splitlines()
                      if re.match(r"\s+d\w+ = None  # TODO: ", l)]
    if number == 4:  # its blanks stay in backward(), which the training run calls
        assert cell_of(starter, "backward").source.strip() in exercises.starter_text(number)
        assert cell_of(solved, "backward").source.strip() in exercises.solution_text(number)
        assert cell_of(starter, "check").source == "result = check(4, backward)"
        return
    assert [c.source for c in blank_cells(starter)] == starter_blanks
    assert [c.source for c in blank_cells(solved)] == [b.answer for b in parts.blanks]
    check_source = cell_of(starter, "check").source
    for name, variable in parts.returned:
        assert f'"{name}": {variable}' in check_source


def test_install_cell_imports_and_invents_no_address():
    source = cell_of(notebook_build.notebook(1), "install").source
    assert "import backprop_ninja" in source and "SOURCE = None" in source
    assert "http" not in source and "/" not in source.replace("//", "")


def test_intro_keeps_angle_brackets_visible():
    intro = notebook_build.notebook(1).cells[0].source
    assert "&lt;name&gt;" in intro and "Contract" not in intro and "THIS_FILE" not in intro


# ---------------------------------------------------------------------------------------------
# executed in a real kernel (nbclient + ipykernel): one kernel, reset between notebooks

@pytest.fixture(scope="module")
def kernel():
    from jupyter_client.manager import KernelManager

    km = KernelManager(kernel_name="python3")
    km.start_kernel()
    yield km
    km.shutdown_kernel(now=True)


def execute(nb, km):
    from nbclient import NotebookClient

    nb.cells.insert(0, nbformat.v4.new_code_cell("%reset -f", id="reset"))
    NotebookClient(nb, km=km, timeout=120).execute()
    (output,) = nb.cells[-1].outputs
    return output.data


@pytest.mark.parametrize("number", [1, 2, 3, 4, 5, 6, 7, 8])
def test_solved_notebook_passes_in_a_kernel(number, kernel):
    data = execute(notebook_build.notebook(number, solution=True), kernel)
    assert data["text/plain"].endswith("all correct: well done"), data["text/plain"]
    html = data["text/html"]
    assert "<table>" in html and all(f"<th>{h}</th>" in html
                                     for h in ("tensor", "shape", "exact", "approx", "maxdiff"))


@pytest.mark.parametrize("number, first, where", [
    (1, "dlogprobs", "its cell"), (2, "dlogits", "its cell"), (3, "dhprebn", "its cell"),
    (4, "dW2", "the blank at Cell In["), (6, "dv", "its cell")])
def test_starter_notebook_fails_readably_in_a_kernel(number, first, where, kernel):
    data = execute(notebook_build.notebook(number), kernel)
    text = data["text/plain"]
    assert f"first wrong: {first}" in text and f"{first} is still None: fill in {where}" in text
    assert "Traceback" not in text and "all correct" not in text
    assert f"first wrong: {first}" in data["text/html"]


# ---------------------------------------------------------------------------------------------
# graded headless: as the check cell grades

@pytest.mark.parametrize("number", [1, 2, 3])
def test_headless_grade_is_the_py_files(number, tmp_path, setup):
    nb_result = checker.check(number, save(notebook_build.notebook(number, True), tmp_path), setup=setup)
    py = tmp_path / "mine.py"
    py.write_text(exercises.solution_text(number))
    assert nb_result.ok and nb_result.text == checker.check(number, py, setup=setup).text


def test_headless_exercise4_trains(tmp_path, setup, names):
    result = checker.check(4, save(notebook_build.notebook(4, True), tmp_path), setup=setup, data=names)
    assert result.ok and "your gradients train the network" in result.text


def test_headless_starter_names_the_first_blank_and_its_cell(tmp_path, setup):
    nb = notebook_build.notebook(1)
    cell_of(nb, "blank", "dlogprobs").source = exercises.template_parts(1).blanks[0].answer
    result = checker.check(1, save(nb, tmp_path), setup=setup)
    k = nb.cells.index(cell_of(nb, "blank", "dprobs")) + 1
    assert not result.ok and "first wrong: dprobs" in result.text
    assert f"dprobs is still None: fill in its cell (cell {k})" in result.text
    assert "1/26 gradients match" in result.text


def test_lectures_solution_keeps_its_one_shape_flag(tmp_path, setup):
    """Typed as the video shows it: every value right, dbnmeani's dropped keepdim flagged."""
    body = "".join(f"    {line}\n" for line in LECTURE_EXERCISE1.splitlines())
    solution = exercises.solution_text(1)
    start = solution.index("    n = Xb.shape[0]\n", solution.index("def backward("))
    end = solution.index("    return dict(logprobs")
    py = tmp_path / "lecture.py"
    py.write_text(solution[:start] + "    n = Xb.shape[0]\n" + body + solution[end:])
    for path in (py, save(lecture_notebook(), tmp_path, "lecture.ipynb")):
        result = checker.check(1, path, setup=setup)
        assert "25/26 gradients match autograd" in result.text, result.text
        assert "first wrong: dbnmeani" in result.text
        assert "has shape [64] but bnmeani is [1, 64] (the values are right)" in result.text
        assert "keepdim=True" in result.text


def test_planted_mistake_in_a_cell_gets_the_py_files_hint(tmp_path, setup):
    nb = with_cell(1, "dbndiff", "dbndiff = 2 * bndiff * dbndiff2")
    result = checker.check(1, save(nb, tmp_path), setup=setup)
    assert "first wrong: dbndiff" in result.text and "also feeds bnraw" in result.text


def test_error_in_a_cell_names_the_cell_and_an_earlier_wrong_gradient(tmp_path, setup):
    nb = with_cell(1, "dcounts_sum_inv", "dcounts_sum_inv = (counts * dprobs).sum(1)")
    path = save(nb, tmp_path)
    k = nb.cells.index(cell_of(nb, "blank", "dcounts")) + 1
    result = checker.check(1, path, setup=setup)
    assert f"{path}, cell {k} (dcounts), line 2: RuntimeError while running the cell" \
        in result.text, result.text
    assert "before that line, dcounts_sum_inv was already wrong" in result.text


def test_magics_and_shell_lines_are_skipped(tmp_path, setup):
    nb = notebook_build.notebook(2, True)
    nb.cells.insert(3, nbformat.v4.new_code_cell("%pip install nothing\n!ls\nx = 1"))
    nb.cells.insert(4, nbformat.v4.new_code_cell("%%bash\nexit 1"))
    assert checker.check(2, save(nb, tmp_path), setup=setup).ok


def test_autograd_is_off_in_headless_cells(tmp_path, setup):
    nb = with_cell(2, "dlogits", "x = logits.clone().requires_grad_()\n"
                                 "F.cross_entropy(x, inputs['Yb']).backward()\ndlogits = x.grad")
    result = checker.check(2, save(nb, tmp_path), setup=setup)
    assert not result.ok and "autograd was used" in result.text


# ---------------------------------------------------------------------------------------------
# check() itself: explicit tensors, its own reference

def test_check_grades_passed_tensors_with_the_files_text(setup, tmp_path, capsys):
    solution = {}
    exec(exercises.solution_text(2), solution)
    result = notebook.check(2, solution["backward"](**notebook.exercise_inputs(2)))
    py = tmp_path / "mine.py"
    py.write_text(exercises.solution_text(2))
    assert result.ok and result.text == checker.check(2, py, setup=setup).text
    assert capsys.readouterr().out == result.text + "\n"  # no notebook: the text


def test_check_neither_reads_nor_writes_the_callers_globals():
    inputs = notebook.exercise_inputs(2)
    namespace = {"check": notebook.check, "dlogits": "not this one",
                 "g": atomic.fused_dlogits(inputs["logits"], inputs["Yb"])}
    before = dict(namespace)
    exec("result = check(2, {'logits': g})", namespace)
    assert namespace.pop("result").ok
    namespace.pop("__builtins__")
    assert namespace == before


def test_check_trusts_neither_edited_inputs_nor_stale_grads():
    inputs = notebook.exercise_inputs(2)
    original = inputs["logits"].clone()
    inputs["logits"] += 1.0  # the learner's copy: the reference is not moved by it
    inputs["logits"].grad = torch.zeros_like(inputs["logits"])
    assert torch.equal(notebook.exercise_inputs(2)["logits"], original)
    shifted = atomic.fused_dlogits(inputs["logits"] * 2, inputs["Yb"])
    assert not notebook.check(2, {"logits": shifted}).ok
    assert notebook.check(2, {"logits": atomic.fused_dlogits(inputs["logits"], inputs["Yb"])}).ok


def test_check_refuses_the_wrong_kind_of_answer():
    assert "pass the function itself, check(4, backward)" in notebook.check(4, {}).text
    assert "takes a dict" in notebook.check(2, [1, 2]).text
    graph = notebook.exercise_inputs(2)["logits"].requires_grad_() * 1
    assert "part of an autograd graph" in notebook.check(2, {"logits": graph}).text


def test_html_table_marks_the_wrong_shape():
    inputs = notebook.exercise_inputs(2)
    result = notebook.check(2, {"logits": atomic.fused_dlogits(inputs["logits"], inputs["Yb"]).T})
    html = notebook.result_html(result)
    assert "[27, 32], expected [32, 27]" in html and "first wrong: dlogits" in html


# ---------------------------------------------------------------------------------------------
# broken notebooks: one line each (under the exercise's title, as every check)

def test_not_json(tmp_path):
    path = tmp_path / "mine.ipynb"
    path.write_text('{"cells": [')
    (line,) = report_lines(checker.check(1, path), 1)
    assert line.startswith(f"{path} is not valid JSON (line 1, column 12")
    assert "--init NEW.ipynb" in line


@pytest.mark.parametrize("content, words", [
    ([1, 2], "is JSON but not a Jupyter notebook"),
    ({"cells": []}, "is JSON but not a Jupyter notebook"),
    ({"nbformat": 4, "nbformat_minor": 5, "metadata": {}, "cells": [{"cell_type": "cod"}]},
     "is not a valid Jupyter notebook"),
])
def test_not_a_notebook(content, words, tmp_path):
    path = tmp_path / "mine.ipynb"
    path.write_text(json.dumps(content))
    (line,) = report_lines(checker.check(1, path), 1)
    assert words in line


@pytest.mark.parametrize("drop, words", [
    (("blank", "dprobs"), "has no cell for dprobs (its blank: dprobs = None  # TODO: "
                          "logprobs = probs.log())"),
    (("check", None), "has no check cell (the one that calls check(1, ...))"),
    (("setup", None), "has no setup cell (the one that calls exercise_inputs(1))"),
])
def test_missing_cell_is_named(drop, words, tmp_path):
    nb = notebook_build.notebook(1, True)
    nb.cells.remove(cell_of(nb, *drop))
    (line,) = report_lines(checker.check(1, save(nb, tmp_path)), 1)
    assert words in line


def test_cell_found_by_content_when_its_metadata_is_lost(tmp_path, setup):
    nb = notebook_build.notebook(2, True)
    for c in nb.cells:
        c.metadata = {}
    assert checker.check(2, save(nb, tmp_path), setup=setup).ok


@pytest.mark.parametrize("source, words", [
    ("import sys\nsys.exit('bye')", "(dlogits), line 2: SystemExit while running the cell: bye "
                                    "(the check needs your code to run to its end"),
    ("dlogits = F.softmax(logits, 1)\ndel check", "check not defined any more"),
    ("dlogits = F.softmax(logits, 1)\ncheck = print", "check is no longer the checker's function"),
    ("dlogits = F.softmax(logits, 1)\ndel dlogits", "dlogits not defined any more"),
])
def test_bad_cell_is_one_line(source, words, tmp_path, setup):
    (line,) = report_lines(checker.check(2, save(with_cell(2, "dlogits", source), tmp_path),
                                   setup=setup), 2)
    assert words in line


def test_syntax_error_names_its_cell_and_line(tmp_path, setup):
    path = save(with_cell(2, "dlogits", "x = 1\ndlogits = ("), tmp_path)
    lines = report_lines(checker.check(2, path, setup=setup), 2)
    assert re.fullmatch(rf"{re.escape(str(path))}, cell \d+ \(dlogits\), line 2: SyntaxError: .*",
                        lines[0]) and lines[1].strip() == "dlogits = ("


def test_check_cell_that_does_not_call_check(tmp_path, setup):
    nb = notebook_build.notebook(2, True)
    cell_of(nb, "check").source = "result = None  # check(2, {'logits': dlogits})"
    (line,) = report_lines(checker.check(2, save(nb, tmp_path), setup=setup), 2)
    assert "the check cell did not call check(2, ...)" in line


def test_another_exercises_notebook(tmp_path):
    (line,) = report_lines(checker.check(3, save(notebook_build.notebook(2, True), tmp_path)), 3)
    assert "is exercise 2's notebook; check it with: backprop-ninja exercise 2 --check" in line


# ---------------------------------------------------------------------------------------------
# exercises 5 to 8 as notebooks: graded headless like their .py files

ZOO_MISTAKES = ["5 dxhat without weight", "6 softmax backward without its sum", "7 gain forgotten",
                "8 carried gradient not added"]


@pytest.mark.parametrize("number", [5, 6, 7, 8])
def test_zoo_notebook_solution_passes_and_starter_fails_headless(number, tmp_path):
    solved = checker.check(number, save(notebook_build.notebook(number, True), tmp_path))
    assert solved.ok and solved.text.endswith("all correct: well done"), solved.text
    first = exercises.template_parts(number).blanks[0].name
    starter = checker.check(number, save(notebook_build.notebook(number), tmp_path, "s.ipynb"))
    assert not starter.ok and f"first wrong: {first}" in starter.text
    assert f"{first} is still None: fill in its cell (cell " in starter.text


@pytest.mark.parametrize("mistake", ZOO_MISTAKES)
def test_zoo_notebook_mistake_gets_the_py_files_hint(mistake, tmp_path):
    from test_zoo_exercises import MISTAKES

    number, old, new, count, first, words = MISTAKES[mistake]
    nb = notebook_build.notebook(number, solution=True)
    cells = [c for c in nb.cells if c.cell_type == "code" and old in c.source]
    assert sum(c.source.count(old) for c in cells) == count, mistake
    for c in cells:  # a cell's lines are the template's, dedented
        c.source = c.source.replace(old, new.replace("\n    ", "\n"))
    result = checker.check(number, save(nb, tmp_path))
    assert not result.ok and f"first wrong: {first}" in result.text, result.text
    assert all(w in result.text for w in words), result.text


# ---------------------------------------------------------------------------------------------
# shown to a person: an executed notebook rendered as a web page

def test_executed_notebook_renders_the_table_the_wrong_row_and_its_hint():
    """Executed in a kernel, converted by nbconvert as Jupyter's "save as HTML" does: the check's
    table is an HTML table, the first wrong row is marked and the hint is under the table."""
    import html as html_module

    from nbclient import NotebookClient
    from nbconvert import HTMLExporter

    nb = with_cell(1, "dW2", "dW2 = dlogits.T @ h")  # the missing transpose, planted
    NotebookClient(nb, timeout=120, kernel_name="python3").execute()
    page, _ = HTMLExporter().from_notebook_node(nb)
    assert re.search(r"<table>\s*<thead><tr><th>tensor</th><th>shape</th>", page)
    marked = re.findall(r'<tr class="first-wrong"[^>]*><td>(?:&#10007;|\u2717) (\w+)</td>', page)
    assert marked == ["W2"], marked
    table_end = page.index("</table>", page.index('class="first-wrong"'))
    below = html_module.unescape(page[table_end:])
    assert "first wrong: dW2" in below and "transpose" in below
