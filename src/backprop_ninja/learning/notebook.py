"""The notebook's side of a check: ``exercise_inputs`` and ``check``, which a notebook's cells
import.

``check(N, {"logprobs": dlogprobs, ...})`` grades gradients against a reference it computes
itself from the exercise's seeded problem, with the grading of ``--check`` (``checker``), and
shows the same table: HTML in Jupyter, text elsewhere. In Jupyter it first computes the
gradients again under the same guard as ``--check`` (``guard``): the notebook's setup cell and
the last run of each gradient cell (or of exercise 4's ``backward`` cell) run once more, in a
namespace that holds the notebook's imports and functions but none of its tensors, and those
gradients are graded, not whatever was passed. Outside Jupyter (a script) it grades what it is
given. In a headless run (``notebook_run``) it grades nothing: it hands what it was given to the
checker. Writing notebooks is ``notebook_build``'s job.
"""

from __future__ import annotations

import builtins
import html
import re
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from torch import Tensor

from ..data import Dataset, default_data_path
from .answer import Answer
from .checker import Problem, grade_answer
from .exercises import LECTURE, check_number
from .grading import CheckResult, Task, grade
from .learner import LearnerError, call_learner
from .notebook_run import NotebookCode, current_run, display_function, run_cell
from .race import TrainingPlan, learner_run, make_plan
from .run import graded_keys, passed_gradients


def exercise_inputs(number: int, data_path: str | Path | None = None) -> dict[str, Tensor]:
    """Every tensor the exercise's backward gets, by name, on its seeded problem: copies, so
    editing them cannot change what the check compares with."""
    check_number(number)
    run = current_run()
    if run is not None and data_path is None:
        if number != run.number:
            raise ValueError(f"this is exercise {run.number}'s notebook, not exercise {number}'s")
        return {name: value.clone() for name, value in run.inputs.items()}
    return {name: value.clone() for name, value in session(data_path).task(number).inputs.items()}


def check(number: int, answer, data_path: str | Path | None = None) -> CheckResult | None:
    """Grade your gradients: ``check(1, {"logprobs": dlogprobs, ...})``, or your function:
    ``check(4, backward)``. Shows the table (HTML in Jupyter) and returns the result."""
    check_number(number)
    run = current_run()
    if run is not None and data_path is None:
        run.results.append((number, answer))  # the headless checker grades it
        return None
    result = grade_in_notebook(number, answer, session(data_path))
    show(result)
    return result


@dataclass
class Session:
    """The problem of each exercise on one data file, made once per notebook kernel."""

    data_path: str | None = None
    tasks: dict[int, Task] = field(default_factory=dict)
    setup: object = None
    plan: TrainingPlan | None = None

    def task(self, number: int) -> Task:
        # the references are imported here, when a kernel grades, never in a headless run: the
        # check's child process does not hold the right answers
        from . import tasks, zoo_exercises
        from ..checking import atomic

        if number not in self.tasks:
            if number in LECTURE:
                self.setup = self.setup or atomic.lecture_check_setup(self.data_path)
                self.tasks[number] = tasks.make_task(number, self.setup)
            else:
                self.tasks[number] = zoo_exercises.TASKS[number]()
        return self.tasks[number]

    def training_plan(self) -> TrainingPlan:
        if self.plan is None:
            self.task(4)
            self.plan = make_plan(Dataset.load(self.data_path or default_data_path()),
                                  self.setup.cfg)
        return self.plan


SESSIONS: dict[str | None, Session] = {}


def session(data_path: str | Path | None) -> Session:
    key = None if data_path is None else str(data_path)
    return SESSIONS.setdefault(key, Session(key))


def grade_in_notebook(number: int, answer, s: Session) -> CheckResult:
    task = s.task(number)  # the reference first: the learner's cells rerun under the guard
    plan = s.training_plan() if number == 4 else None
    try:
        given = recomputed(number, answer, task)
        code = NotebookCode(None, given if callable(given) else None)
        problem = Problem(number, Path("your notebook"), task, code, plan)
        if callable(given):
            gradients = call_learner(given, code, task.inputs)
            result = Answer(gradients=graded_keys(gradients, task.names))
            if number == 4 and grade(task, result.gradients, code).ok:
                try:
                    result.training = learner_run(given, code, plan)
                except LearnerError as e:
                    result.training_error = str(e)
        else:
            result = Answer(gradients=passed_gradients(number, given))
    except LearnerError as e:
        result = Answer(error=str(e), partial=dict(e.partial))
        problem = Problem(number, Path("your notebook"), task, NotebookCode(None), plan)
    return grade_answer(problem, result)


# ---------------------------------------------------------------------------------------------
# in Jupyter: the cells that compute the gradients, run again under the guard

BLANK_CELL_RE = re.compile(r"^d(\w+)\b[^=\n]*[-+*/]?=(?!=)", re.M)
SETUP_RE = re.compile(r"exercise_inputs\((\d+)")
BACKWARD_RE = re.compile(r"^def backward\(", re.M)


@dataclass
class Recorded:
    """The last successful run of each cell that matters to a check, by what it sets."""

    setup: dict[int, tuple[int, str]] = field(default_factory=dict)      # exercise -> cell
    gradient: dict[str, tuple[int, str]] = field(default_factory=dict)   # name -> cell
    backward: tuple[int, str] | None = None


RECORDED = Recorded()


def record_cell(result) -> None:
    """IPython's post_run_cell: keep the source of a cell that sets up or computes gradients."""
    if not getattr(result, "success", False):
        return
    source = getattr(result.info, "raw_cell", "") or ""
    cell = (result.execution_count or 0, source)
    for number in SETUP_RE.findall(source):
        RECORDED.setup[int(number)] = cell
    for name in BLANK_CELL_RE.findall(source):
        RECORDED.gradient[name] = cell
    if BACKWARD_RE.search(source):
        RECORDED.backward = cell


def ipython():
    try:
        from IPython import get_ipython
    except ImportError:
        return None
    return get_ipython()


def register_recorder() -> None:
    shell = ipython()
    if shell is not None and record_cell not in shell.events.callbacks["post_run_cell"]:
        shell.events.register("post_run_cell", record_cell)


register_recorder()


def recomputed(number: int, answer, task: Task):
    """In Jupyter: the answer computed again from the recorded cells, under the guard, in a
    namespace without the notebook's tensors. Elsewhere: the answer as given."""
    shell = ipython()
    if shell is None:
        return answer
    if number not in RECORDED.setup:
        raise LearnerError(f"check({number}, ...) grades the gradients your cells compute: run "
                           f"the setup cell (the one that calls exercise_inputs({number})), then "
                           "your cells, then the check cell")
    namespace = clean_namespace(shell.user_ns)
    cells = [RECORDED.setup[number]]
    if number == 4:
        if RECORDED.backward is None:
            raise LearnerError("check(4, backward) grades the backward your cell defines: run "
                               "the cell that defines it, then the check cell")
        cells.append(RECORDED.backward)
    else:
        cells += [RECORDED.gradient[n] for n in task.names if n in RECORDED.gradient]
    code = NotebookCode(None)
    names = task.names if number != 4 else ()
    for count, source in dict.fromkeys(cells):
        run_cell(source, f"Cell In[{count}]", namespace, code, names)
    if number == 4:
        return namespace.get("backward")
    if not isinstance(answer, Mapping):
        return answer  # refused as it is
    return {name: namespace.get(f"d{name}") for name in answer}


KEPT = (types.ModuleType, types.FunctionType, types.BuiltinFunctionType, type, int, float, str,
        bool, complex, type(None))


def clean_namespace(user_ns: dict) -> dict:
    """The notebook's imports, functions, classes and plain numbers; no tensors, nothing that
    could hold one."""
    namespace = {k: v for k, v in user_ns.items()
                 if not k.startswith("_") and k not in ("In", "Out", "exit", "quit")
                 and isinstance(v, KEPT)}
    namespace.update({"__name__": "__main__", "__builtins__": builtins,
                      "display": display_function()})
    return namespace


def show(result: CheckResult) -> None:
    """The table as HTML where a notebook can draw it, as text anywhere else."""
    try:
        from IPython import get_ipython
        from IPython.display import display
    except ImportError:
        get_ipython = None
    if get_ipython is None or get_ipython() is None:
        print(result.text)
        return
    display({"text/plain": result.text, "text/html": result_html(result)}, raw=True)


def result_html(result: CheckResult) -> str:
    """The check's table in HTML (tensor, shape, exact, approx, maxdiff), the first wrong row
    marked, and below it what the text says under its table (the first wrong one, its hint)."""
    g = result.grade
    if g is None:
        return f'<pre class="backprop-ninja-check">{html.escape(result.text)}</pre>'
    title, *more = g.title.split("\n")
    first = next((r.name for r in g.rows if not r.approx), None)
    rows = "".join(row_html(r, r.name == first) for r in g.rows)
    head = "".join(f"<th>{h}</th>" for h in ("tensor", "shape", "exact", "approx", "maxdiff"))
    tail = "\n".join(g.after_table()).strip()
    return (f'<div class="backprop-ninja-check"><p><b>{html.escape(title)}</b>'
            f"{''.join('<br>' + html.escape(m) for m in more)}</p>"
            f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"
            f"<pre>{html.escape(tail)}</pre></div>")


WRONG = "background-color: rgba(255, 0, 0, 0.15)"
FIRST_WRONG = "background-color: rgba(255, 0, 0, 0.35); font-weight: bold"


def row_html(r, first_wrong: bool = False) -> str:
    """One row; a wrong one tinted, the first wrong one (the one to fix) marked."""
    if r.approx:
        opening = "<tr>"
    elif first_wrong:
        opening = f'<tr class="first-wrong" style="{FIRST_WRONG}" title="the first wrong one">'
    else:
        opening = f'<tr class="wrong" style="{WRONG}">'
    if r.problem is not None:
        shape, exact, approx, diff = "-", "-", "-", f"d{r.name} {r.problem}"
    elif not r.shape_ok:
        shape = f"{list(r.shape)}, expected {list(r.expected_shape)}"
        exact, approx, diff = "False", "False", "-"
    else:
        shape, exact, approx, diff = str(list(r.shape)), str(r.exact), str(r.approx), \
            f"{r.maxdiff:.3g}"
    name = f"&#10007; {html.escape(r.name)}" if first_wrong else html.escape(r.name)
    cells = "".join(f"<td>{c}</td>" for c in
                    (name, *(html.escape(c) for c in (shape, exact, approx, diff))))
    return f"{opening}{cells}</tr>"
