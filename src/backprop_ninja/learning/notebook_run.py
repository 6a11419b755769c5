"""Running a saved notebook's cells without Jupyter, to the answer its check cell passes.

``run_notebook`` runs the code cells in order up to the check cell in a fresh namespace, under
``guard`` (IPython magics and shell lines skipped) and takes what the check cell's ``check`` call
was given: the gradients (or, for exercise 4, the ``backward`` function). It grades nothing: the
checker does (``checker``). Every problem with the notebook itself (not JSON, not a notebook, a
cell missing, an exit, a deleted name) is one line. ``NotebookCode`` names the learner's cells in
messages, headless and in Jupyter.
"""

from __future__ import annotations

import ast
import builtins
import inspect
import json
import linecache
import os
import re
import sysconfig
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from torch import Tensor

from . import exercises, guard
from .hints import Context, first_wrong_advice
from .learner import LearnerError, describe_exception, raise_if_refused, require_file
from .notebook_build import META

BLANK_LEFT_RE = re.compile(r"^\s*d(\w+)\s*=\s*None\b")


@dataclass
class NotebookCode:
    """The learner's code in a notebook, as messages name it. Headless, the cells carry names
    (``ex1.ipynb, cell 12 (dprobs)``); in Jupyter, a frame is the learner's when it is not the
    library's, and IPython names its cell. ``fn``: the function being graded in Jupyter, whose
    source shows which blanks are left (headless: its cell's source)."""

    cells: NotebookCells | None
    fn: object = None

    def __str__(self) -> str:
        return str(self.cells.path) if self.cells else "your notebook"

    def owns(self, filename: str) -> bool:
        if self.cells:
            return filename.startswith(self.cells.prefix)
        return not filename.startswith("<frozen") and \
            not os.path.realpath(filename).startswith(library_dirs())

    def where(self, filename: str, lineno: int) -> str:
        return f"{filename if self.cells else ipython_cell(filename)}, line {lineno}"

    def advice(self, name: str, ctx: Context, names: tuple[str, ...], alternatives) -> str:
        if name not in ctx.got or ctx.got[name] is not None:
            return first_wrong_advice(name, ctx, None, alternatives)
        left = self.function_blanks() if self.graded_function() else self.cell_blanks(ctx, names)
        if name not in left:
            return f"d{name} is None: it must be a tensor of {name}'s shape"
        first = next(iter(left))
        text = f"d{name} is still None: fill in {left[name][0]}"
        return text if first == name else \
            f"{text}, after the first blank above it, d{first}{left[first][1]}"

    def graded_function(self) -> bool:
        return self.fn is not None or bool(self.cells and self.cells.backward_source)

    def cell_blanks(self, ctx: Context, names: tuple[str, ...]) -> dict[str, tuple[str, str]]:
        """The gradients passed as None, in backward order (the cells' order): how to name the
        blank, and how to name it as the first one above."""
        def cell(name: str) -> tuple[str, str]:
            k = self.cells.blanks.get(f"d{name}") if self.cells else None
            return (f"its cell (cell {k})", f" (cell {k})") if k else ("its cell", "")
        return {n: cell(n) for n in names if n in ctx.got and ctx.got[n] is None}

    def function_blanks(self) -> dict[str, tuple[str, str]]:
        """The ``d<name> = None`` lines left in the graded function, in order, and where."""
        if self.fn is None:
            k = self.cells.blanks["backward"]
            lines, start, filename = self.cells.backward_source.splitlines(), 1, self.cells.label(k)
        else:
            try:
                lines, start = inspect.getsourcelines(self.fn)
                filename = self.fn.__code__.co_filename
            except (OSError, TypeError, AttributeError):
                return {}
        left: dict[str, tuple[str, str]] = {}
        for i, line in enumerate(lines):
            match = BLANK_LEFT_RE.match(line)
            if match and match.group(1) not in left:
                where = self.where(filename, start + i)
                left[match.group(1)] = (f"the blank at {where}", f" at {where}")
        return left


def library_dirs() -> tuple[str, ...]:
    """Where code that is not the learner's lives: the standard library, installed packages and
    this package (which may be installed from a source tree)."""
    paths = sysconfig.get_paths()
    dirs = {paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    dirs.add(str(Path(__file__).resolve().parents[1]))
    return tuple(os.path.realpath(d) + os.sep for d in dirs)


def ipython_cell(filename: str) -> str:
    """IPython's name of the cell a function came from (``Cell In[7]``) when it keeps one."""
    try:
        from IPython import get_ipython

        if filename.startswith("Cell In["):  # a cell the check ran again, named so
            return filename
        return f"Cell In[{get_ipython().compile._filename_map[filename]}]"
    except Exception:  # no IPython, no shell, or a version that keeps no such map
        return "your cell"


@dataclass
class NotebookCells:
    """The cells the headless check needs, by 1-based position, and their names in messages."""

    path: Path
    setup: int
    check: int
    blanks: dict[str, int]      # d<name> (or "backward", exercise 4) -> its cell
    backward_source: str = ""   # exercise 4: the backward cell's code, for the blanks left in it

    @property
    def prefix(self) -> str:
        return f"{self.path}, cell "

    def label(self, k: int) -> str:
        """The cell as a message names it, and the file name its code runs under."""
        names = {self.setup: "setup", self.check: "check",
                 **{v: n for n, v in self.blanks.items()}}
        return f"{self.prefix}{k}" + (f" ({names[k]})" if k in names else "")


@dataclass
class HeadlessRun:
    """A headless run under way: the inputs its ``exercise_inputs`` gives (the checker's), and
    what its cells passed to ``check``."""

    number: int
    inputs: dict[str, Tensor]
    results: list[tuple[int, object]] = field(default_factory=list)


HEADLESS: list[HeadlessRun] = []  # the headless run under way, if one is


def current_run() -> HeadlessRun | None:
    return HEADLESS[-1] if HEADLESS else None


@contextmanager
def headless(run: HeadlessRun):
    """``check`` and ``exercise_inputs`` serve ``run`` meanwhile: check() records, not grades."""
    HEADLESS.append(run)
    try:
        yield run
    finally:
        HEADLESS.pop()


def open_notebook(number: int, path: str | Path):
    """The notebook and its cells, or a LearnerError saying in one line what is wrong with it."""
    path = Path(path)
    require_file(path)
    nb = read_notebook(path, number)
    return nb, find_cells(nb, number, path)


def run_notebook(number: int, path: str | Path, inputs: dict[str, Tensor],
                 names: tuple[str, ...]) -> tuple[object, NotebookCode]:
    """Run the notebook's cells as Jupyter would, up to its check cell, and return what that cell
    passed to ``check`` (the gradients, or exercise 4's function) and the code, as messages name
    it. The learner's errors raise LearnerError, with the gradients computed by then."""
    nb, cells = open_notebook(number, path)
    code = NotebookCode(cells)
    namespace = {"__name__": "__main__", "__builtins__": builtins, "display": display_function()}
    run = HeadlessRun(number, inputs)
    with headless(run):
        for k, cell in enumerate(nb.cells[:cells.check], 1):
            if cell.cell_type != "code":
                continue
            if k == cells.check:
                check_names(cell.source, namespace, cells.label(k))
            done = len(run.results)
            run_cell(cell.source, cells.label(k), namespace, code, names if number != 4 else ())
            if k == cells.check:
                return check_cell_result(run.results[done:], number, cells.label(k)), code
    raise AssertionError("find_cells found the check cell")


def run_cell(source: str, label: str, namespace: dict, code: NotebookCode,
             names: tuple[str, ...]) -> None:
    """One cell under its label (linecache keeps its source, for tracebacks and inspect), under
    the guard; an error is a LearnerError with the gradients ``names`` computed by then."""
    text = without_magics(source)
    linecache.cache[label] = (len(text), None, text.splitlines(True), label)
    try:
        compiled = compile(text, label, "exec")
    except SyntaxError as e:
        line = f"\n    {e.text.strip()}" if e.text and e.text.strip() else ""
        raise LearnerError(f"{label}, line {e.lineno}: SyntaxError: {e.msg}{line}") from None
    try:
        with guard.guarded():
            exec(compiled, namespace)
            raise_if_refused()
    except (Exception, SystemExit) as e:
        raise LearnerError(describe_exception(e, code, "while running the cell"),
                           computed_in(namespace, names)) from None


def computed_in(namespace: dict, names: tuple[str, ...]) -> dict[str, Tensor]:
    """The gradients the cells above had computed, for the advice when a cell raises."""
    return {n: namespace[f"d{n}"] for n in names if isinstance(namespace.get(f"d{n}"), Tensor)}


def read_notebook(path: Path, number: int):
    """The notebook in ``path``, validated; anything else is one line saying what is wrong."""
    import nbformat

    again = f"start again from: backprop-ninja exercise {number} --init NEW.ipynb"
    try:
        text = path.read_text(encoding="utf-8")
        raw = json.loads(text)
    except UnicodeDecodeError:
        raise LearnerError(f"{path} is not UTF-8 text, so not a notebook; {again}") from None
    except json.JSONDecodeError as e:
        raise LearnerError(f"{path} is not valid JSON (line {e.lineno}, column {e.colno}: "
                           f"{e.msg}), so not a notebook: was it saved completely? Or {again}") \
            from None
    if not isinstance(raw, dict) or "nbformat" not in raw:
        raise LearnerError(f"{path} is JSON but not a Jupyter notebook (it has no nbformat "
                           f"version); {again}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            nb = nbformat.convert(nbformat.reader.reads(text), 4)
            nbformat.validate(nb)
    except (nbformat.ValidationError, ValueError, KeyError, TypeError, AttributeError) as e:
        reason = str(getattr(e, "message", e)).splitlines()[0] if str(e) else type(e).__name__
        raise LearnerError(f"{path} is not a valid Jupyter notebook ({reason[:200]}); "
                           f"{again}") from None
    other = nb.metadata.get(META, {}).get("exercise")
    if isinstance(other, int) and other != number:
        raise LearnerError(f"{path} is exercise {other}'s notebook; check it with: "
                           f"backprop-ninja exercise {other} --check {path}")
    return nb


def find_cells(nb, number: int, path: Path) -> NotebookCells:
    """The setup, blank (or backward) and check cells: by their metadata, or failing that (a
    cell copied without it) by what they do. A missing one is one line naming it."""
    found: dict[str, int] = {}
    wanted = ["backward"] if number == 4 else \
        [b.name for b in exercises.template_parts(number).blanks]
    for k, cell in enumerate(nb.cells, 1):
        if cell.cell_type != "code":
            continue
        for role in cell_roles(cell, number, wanted):
            found.setdefault(role, k)
    missing_cell("setup", found, path, f"the one that calls exercise_inputs({number})", number)
    missing = [name for name in wanted if name not in found]
    if missing:
        what = "defining backward(...)" if number == 4 else \
            "for " + ", ".join(missing) + f" (its blank: {blank_of(number, missing[0])})"
        raise LearnerError(f"{path} has no cell {what}; put it back above the check cell, e.g. "
                           f"from a new notebook: backprop-ninja exercise {number} --init "
                           "NEW.ipynb")
    missing_cell("check", found, path, f"the one that calls check({number}, ...)", number)
    source = without_magics(nb.cells[found["backward"] - 1].source) if number == 4 else ""
    return NotebookCells(path, found["setup"], found["check"], {n: found[n] for n in wanted},
                         source)


def missing_cell(role: str, found: dict[str, int], path: Path, what: str, number: int) -> None:
    if role not in found:
        raise LearnerError(f"{path} has no {role} cell ({what}); copy it from a new notebook: "
                           f"backprop-ninja exercise {number} --init NEW.ipynb")


def blank_of(number: int, name: str) -> str:
    blank = next(b for b in exercises.template_parts(number).blanks if b.name == name)
    return blank.text(solution=False)


def cell_roles(cell, number: int, wanted: list[str]) -> list[str]:
    meta = cell.metadata.get(META, {})
    roles = [meta.get("name") or meta.get("role")] if isinstance(meta, dict) else []
    source = cell.source
    if f"exercise_inputs({number}" in source:
        roles.append("setup")
    if re.search(rf"^\s*\w+\s*=\s*check\({number}\b|^check\({number}\b", source, re.M):
        roles.append("check")
    if number == 4 and re.search(r"^def backward\(", source, re.M):
        roles.append("backward")
    roles += [n for n in wanted if re.search(rf"^{n}\b[^=\n]*[-+*/]?=(?!=)", source, re.M)]
    return [r for r in roles if r]


def without_magics(source: str) -> str:
    """The cell with IPython magics and shell lines (``%pip``, ``!ls``) made ``pass``: they need
    a Jupyter kernel, and the headless check has none. A cell magic skips its cell, except the
    ones that run the cell's Python as it is (``%%time``, ``%%capture``)."""
    lines = source.splitlines()
    if lines and lines[0].startswith("%%"):
        if lines[0].split()[0] not in ("%%time", "%%timeit", "%%capture", "%%prun"):
            return ""
        lines = ["pass"] + lines[1:]
    return "\n".join(re.sub(r"^(\s*)[%!].*$", r"\1pass", line) for line in lines)


def check_names(source: str, namespace: dict, label: str) -> None:
    """Before the check cell: the names it passes are there, and check is still the checker's."""
    try:
        tree = ast.parse(without_magics(source))
    except SyntaxError:
        return  # run_cell reports it with its line
    names = [n for n in ast.walk(tree) if isinstance(n, ast.Name)]
    used = {n.id for n in names if isinstance(n.ctx, ast.Load)}
    set_here = {n.id for n in names if not isinstance(n.ctx, ast.Load)}
    missing = sorted(n for n in used - set_here if n not in namespace and not hasattr(builtins, n))
    if missing:
        raise LearnerError(f"{label}: {', '.join(missing)} not defined any more: a cell above "
                           "deleted or never set it; run the notebook from the top, or put it "
                           "back")
    if "check" in used and not is_the_check(namespace.get("check")):
        raise LearnerError(f"{label}: check is no longer the checker's function (a cell above "
                           "replaced it): put back: from backprop_ninja.learning.notebook "
                           "import check")


def is_the_check(fn) -> bool:
    """``fn`` is the notebook's check (``notebook.check``, the API this module sits below)."""
    return getattr(fn, "__module__", None) == "backprop_ninja.learning.notebook" and \
        getattr(fn, "__name__", None) == "check"


def check_cell_result(results: list[tuple[int, object]], number: int, label: str) -> object:
    if not results:
        raise LearnerError(f"{label}: the check cell did not call check({number}, ...)")
    called, answer = results[-1]
    if called != number:
        raise LearnerError(f"{label}: the check cell grades exercise {called}, but this is "
                           f"exercise {number}'s check")
    return answer


def display_function():
    """IPython's display where installed (it prints text without a notebook), else print:
    a learner's cell may call display() as it would in Jupyter."""
    try:
        from IPython.display import display
    except ImportError:
        return print
    return display
