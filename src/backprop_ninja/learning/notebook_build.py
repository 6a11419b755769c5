"""The exercises as Jupyter (or Colab) notebooks, written from the exercise's ``.py`` template
(``exercises.template_parts``), so the two never drift apart: a markdown introduction, a cell
that imports (or installs) the package, the setup cell with the forward pass done, one cell per
blank (``d<name> = None  # TODO: ...``, the starter's own lines; exercise 4's blanks stay inside
its ``backward`` function, which the check trains with), and a check cell. Cells carry their role
in their metadata (``META``), which the headless check (``notebook_run``) finds them by.
"""

from __future__ import annotations

import html
import re
from pathlib import Path

from . import exercises
from .exercises import TITLES, check_number

META = "backprop_ninja"  # the key of this package's notebook and cell metadata


KERNELSPEC = {"name": "python3", "display_name": "Python 3", "language": "python"}


def notebook(number: int, solution: bool = False):
    """The exercise's notebook: the starter, or with ``solution`` every blank filled in."""
    import nbformat

    check_number(number)
    parts = exercises.template_parts(number)
    cells = [markdown("intro", intro_text(number, parts)),
             markdown("install-note", INSTALL_NOTE), code("install", INSTALL_CELL),
             markdown("setup-note", setup_note(number)), code("setup", setup_source(number, parts)),
             markdown("work-note", work_note(number)), *work_cells(number, parts, solution),
             markdown("check-note", check_note(number)), code("check", check_source(number, parts))]
    metadata = {"kernelspec": KERNELSPEC, "language_info": {"name": "python"},
                META: {"exercise": number, "solution": solution}}
    return nbformat.v4.new_notebook(cells=cells, metadata=metadata)


def write_notebook(number: int, path: str | Path, solution: bool = False,
                   force: bool = False) -> Path:
    import nbformat

    return exercises.write_new(path, nbformat.writes(notebook(number, solution)), force)


def markdown(cell_id: str, text: str):
    import nbformat

    return nbformat.v4.new_markdown_cell(text, id=cell_id)


def code(role: str, source: str, name: str | None = None):
    """A code cell whose metadata says what it is for: the headless check finds cells by it."""
    import nbformat

    meta = {"role": role, **({"name": name} if name else {})}
    cell_id = f"{role}-{name}" if name else role
    return nbformat.v4.new_code_cell(source, id=cell_id, metadata={META: meta})


def intro_text(number: int, parts: exercises.TemplateParts) -> str:
    """The template's docstring, less what only a .py file needs, and how to work here."""
    paragraphs = [markdown_safe(p) for p in parts.docstring.split("\n\n")
                  if not p.startswith(("Contract", "Check it"))]
    return "\n\n".join([f"# {TITLES[number].capitalize()}", *paragraphs, HOW_TO[number == 4]])


def markdown_safe(text: str) -> str:
    """``<name>`` outside code spans would be read as an HTML tag, and vanish."""
    pieces = re.split(r"(`+[^`]*`+)", text)
    return "".join(p if p.startswith("`") else html.escape(p, quote=False) for p in pieces)


HOW_TO = {
    False: "**In this notebook** the body of `backward()` is the cells under *Your gradients*, "
           "one per blank, at the top level: the tensors `backward()` would get are variables "
           "of the same names, set by the setup cell. Fill in the cells from the top down and "
           "run them, then run the check cell: it grades your gradients against autograd on the "
           "same batch (a row per tensor; the first wrong one named, with a hint).",
    True: "**In this notebook** `backward()` is one cell, blanks and all: the check calls it on "
          "the check batch, then trains the network with it for 500 steps. Fill in its blanks, "
          "run it (try `backward(**inputs)`), then run the check cell.",
}
INSTALL_NOTE = ("This notebook needs the `backprop-ninja` package in its Python. If the next "
                "cell says it is missing, set `SOURCE` in it to the project (its folder, a wheel "
                "or a repository: anything `pip install` accepts) and run it again; it installs "
                "the package with the notebook's own Python (in Colab too).")
INSTALL_CELL = '''\
SOURCE = None  # the backprop-ninja project, if it is not installed: anything pip install accepts
import importlib
import subprocess
import sys

try:
    import backprop_ninja
except ImportError:
    if SOURCE is None:
        raise ImportError("backprop_ninja is not installed in this notebook's Python: set "
                          "SOURCE above to the project and run this cell again") from None
    subprocess.check_call([sys.executable, "-m", "pip", "install", "--quiet", SOURCE])
    importlib.invalidate_caches()
    import backprop_ninja'''


def setup_note(number: int) -> str:
    what = "the lecture's check batch" if number in exercises.LECTURE else \
        "the exercise's problem (small inputs and an upstream gradient)"
    return (f"## The forward pass (done)\n\n`exercise_inputs` gives {what} (seeded: the same "
            "every time) and every tensor of the forward pass below, computed on it, as plain "
            "tensors: what `backward()` gets.")


def work_note(number: int) -> str:
    if number == 4:
        return "## Your backward\n\nFill in each `d<name> = None`, from the loss down."
    return ("## Your gradients\n\nOne cell per tensor, in backward order: replace `None` with "
            "the gradient of the loss; the comment shows the forward line it comes from.")


def check_note(number: int) -> str:
    return ("## Check\n\nGrades your gradients against autograd, computed afresh on the same "
            "inputs. From a terminal: `backprop-ninja exercise "
            f"{number} --check THIS_NOTEBOOK.ipynb`.")


def setup_source(number: int, parts: exercises.TemplateParts) -> str:
    imports = ["import torch"] + [i for i in parts.imports if i != "import torch"]
    lines = [*imports, "from backprop_ninja.learning.notebook import check, exercise_inputs",
             "", "", parts.forward, "", "",
             f"inputs = exercise_inputs({number})  # by name: what backward() gets"]
    if number != 4:
        lines += unpack_lines(parts.arguments)
        lines += [parts.preamble] if parts.preamble else []
    return "\n".join(lines)


def unpack_lines(names: list[str], width: int = 99) -> list[str]:
    """``a, b = inputs["a"], inputs["b"]`` lines for ``names``, each within ``width``."""
    lines, group = [], []
    for name in names:
        trial = group + [name]
        text = ", ".join(trial) + " = " + ", ".join(f'inputs["{n}"]' for n in trial)
        if group and len(text) > width:
            lines.append(", ".join(group) + " = " + ", ".join(f'inputs["{n}"]' for n in group))
            trial = [name]
        group = trial
    if group:
        lines.append(", ".join(group) + " = " + ", ".join(f'inputs["{n}"]' for n in group))
    return lines


def work_cells(number: int, parts: exercises.TemplateParts, solution: bool) -> list:
    if number == 4:
        return [code("backward", exercises.render(parts.backward, solution).rstrip("\n"))]
    return [code("blank", blank.text(solution), blank.name) for blank in parts.blanks]


def check_source(number: int, parts: exercises.TemplateParts, width: int = 99) -> str:
    if number == 4:
        return "result = check(4, backward)"
    entries = [f'"{name}": {variable}' for name, variable in parts.returned]
    one_line = f"result = check({number}, {{{', '.join(entries)}}})"
    if len(one_line) <= width:
        return one_line
    lines, line = [], "   "
    for entry in entries:
        if len(line) + len(entry) + 2 > width:
            lines.append(line.rstrip())
            line = "   "
        line += f" {entry},"
    lines.append(line.rstrip(","))
    return "\n".join([f"result = check({number}, {{", *lines, "})"])
