"""Grading a saved notebook without Jupyter, and where a notebook's ``check`` finds its batch.

``check_notebook`` runs the code cells in order in a fresh namespace (IPython magics and shell
lines skipped, autograd switched off) and takes the result of the check cell's own ``check``
call. Every problem with the notebook itself (not JSON, not a notebook, a cell missing, an exit,
a deleted name) is one line. ``Session`` holds the check batch of one data file and each
exercise's reference on it; ``NotebookCode`` names the learner's cells in messages.
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

from ..checking import atomic
from ..data import Dataset, default_data_path
from . import exercises
from .exercises import TITLES, check_number
from .grading import CheckResult, Task, explain_failure
from .hints import Context, first_wrong_advice
from .learner import LearnerError, autograd_forbidden, describe_exception, no_hard_exit, require_file
from .notebook_build import META
from .tasks import make_task

BLANK_LEFT_RE = re.compile(r"^\s*d(\w+)\s*=\s*None\b")


@dataclass
class Session:
    """The check batch of one data file, made once, and the reference of each exercise on it. A
    headless run has its own (with the cells it runs); a notebook shares one per data file."""

    data_path: str | None = None
    setup: atomic.CheckSetup | None = None
    data: Dataset | None = None
    headless: bool = False
    cells: NotebookCells | None = None
    results: list[tuple[int, CheckResult]] = field(default_factory=list)
    tasks: dict[int, Task] = field(default_factory=dict)

    def check_setup(self) -> atomic.CheckSetup:
        if self.setup is None:
            self.setup = atomic.lecture_check_setup(self.data_path)
        return self.setup

    def dataset(self) -> Dataset:
        if self.data is None:
            self.data = Dataset.load(self.data_path or default_data_path())
        return self.data

    def task(self, number: int) -> Task:
        if number not in self.tasks:
            self.tasks[number] = make_task(number, self.check_setup())
        return self.tasks[number]

    def code(self, fn) -> NotebookCode:
        return NotebookCode(self.cells, fn)


SESSIONS: dict[str | None, Session] = {}


HEADLESS: list[Session] = []  # the session of the headless run under way, if one is


def session(data_path: str | Path | None) -> Session:
    if HEADLESS and data_path is None:
        return HEADLESS[-1]
    key = None if data_path is None else str(data_path)
    return SESSIONS.setdefault(key, Session(key))


@dataclass
class NotebookCode:
    """The learner's code in a notebook, as messages name it. Headless, the cells carry names
    (``ex1.ipynb, cell 12 (dprobs)``); in Jupyter, a frame is the learner's when it is not the
    library's, and IPython names its cell. ``fn``: the function being graded, whose source shows
    which blanks are left."""

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
        left = self.function_blanks() if self.fn else self.cell_blanks(ctx, names)
        if name not in left:
            return f"d{name} is None: it must be a tensor of {name}'s shape"
        first = next(iter(left))
        text = f"d{name} is still None: fill in {left[name][0]}"
        return text if first == name else \
            f"{text}, after the first blank above it, d{first}{left[first][1]}"

    def cell_blanks(self, ctx: Context, names: tuple[str, ...]) -> dict[str, tuple[str, str]]:
        """The gradients passed as None, in backward order (the cells' order): how to name the
        blank, and how to name it as the first one above."""
        def cell(name: str) -> tuple[str, str]:
            k = self.cells.blanks.get(f"d{name}") if self.cells else None
            return (f"its cell (cell {k})", f" (cell {k})") if k else ("its cell", "")
        return {n: cell(n) for n in names if n in ctx.got and ctx.got[n] is None}

    def function_blanks(self) -> dict[str, tuple[str, str]]:
        """The ``d<name> = None`` lines left in the graded function, in order, and where."""
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

    @property
    def prefix(self) -> str:
        return f"{self.path}, cell "

    def label(self, k: int) -> str:
        """The cell as a message names it, and the file name its code runs under."""
        names = {self.setup: "setup", self.check: "check",
                 **{v: n for n, v in self.blanks.items()}}
        return f"{self.prefix}{k}" + (f" ({names[k]})" if k in names else "")


def check_notebook(number: int, path: str | Path, data_path: str | Path | None = None,
                   setup: atomic.CheckSetup | None = None,
                   data: Dataset | None = None) -> CheckResult:
    """Grade a saved notebook as its check cell would in Jupyter: run its code cells in order up
    to the check cell, in a fresh namespace, and return what that cell's ``check`` gave."""
    check_number(number)
    path = Path(path)
    require_file(path)
    try:
        nb = read_notebook(path, number)
        cells = find_cells(nb, number, path)
        s = Session(None if data_path is None else str(data_path), setup, data, headless=True,
                    cells=cells)
        return run_cells(nb, number, cells, s)
    except LearnerError as e:
        return CheckResult(f"{TITLES[number]}\n{e}", False)


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
    return NotebookCells(path, found["setup"], found["check"], {n: found[n] for n in wanted})


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


def run_cells(nb, number: int, cells: NotebookCells, s: Session) -> CheckResult:
    """Run the code cells up to the check cell in one fresh namespace, autograd off outside the
    check cell, then the check cell; its check() call is the result."""
    namespace = {"__name__": "__main__", "__builtins__": builtins, "display": display_function()}
    with headless(s):
        task = s.task(number)  # the reference first: autograd is off in the learner's cells
        for k, cell in enumerate(nb.cells[:cells.check], 1):
            if cell.cell_type != "code":
                continue
            if k == cells.check:
                check_names(cell.source, namespace, cells.label(k))
                done = len(s.results)
                run_cell(cell.source, cells.label(k), namespace, number, task, s)
                return check_cell_result(s.results[done:], number, cells.label(k))
            with autograd_forbidden():
                run_cell(cell.source, cells.label(k), namespace, number, task, s)
    raise AssertionError("find_cells found the check cell")


def run_cell(source: str, label: str, namespace: dict, number: int, task: Task,
             s: Session) -> None:
    """One cell under its label (linecache keeps its source, for tracebacks and inspect)."""
    text = without_magics(source)
    linecache.cache[label] = (len(text), None, text.splitlines(True), label)
    try:
        compiled = compile(text, label, "exec")
    except SyntaxError as e:
        line = f"\n    {e.text.strip()}" if e.text and e.text.strip() else ""
        raise LearnerError(f"{label}, line {e.lineno}: SyntaxError: {e.msg}{line}") from None
    try:
        with no_hard_exit():
            exec(compiled, namespace)
    except (Exception, SystemExit) as e:
        code_ = s.code(None)
        error = LearnerError(describe_exception(e, code_, "while running the cell"),
                             computed_in(namespace, task) if number != 4 else {})
        raise explain_failure(error, task, code_) from None


def computed_in(namespace: dict, task: Task) -> dict[str, Tensor]:
    """The gradients the cells above had computed, for the advice when a cell raises."""
    return {n: namespace[f"d{n}"] for n in task.names
            if isinstance(namespace.get(f"d{n}"), Tensor)}


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


def check_cell_result(results: list[tuple[int, CheckResult]], number: int,
                      label: str) -> CheckResult:
    if not results:
        raise LearnerError(f"{label}: the check cell did not call check({number}, ...)")
    called, result = results[-1]
    if called != number:
        raise LearnerError(f"{label}: the check cell grades exercise {called}, but this is "
                           f"exercise {number}'s check")
    return result


def display_function():
    """IPython's display where installed (it prints text without a notebook), else print:
    a learner's cell may call display() as it would in Jupyter."""
    try:
        from IPython.display import display
    except ImportError:
        return print
    return display


@contextmanager
def headless(s: Session):
    """``check`` and ``exercise_inputs`` use ``s`` meanwhile, and check() records, not shows."""
    HEADLESS.append(s)
    try:
        yield s
    finally:
        HEADLESS.pop()
