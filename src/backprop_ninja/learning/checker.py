"""The checker of the exercises: it grades a learner's file against autograd.

A starter file (see ``exercises``) holds the forward pass, done, and a ``backward`` function whose
gradients are blanks. The checker sets the exercise's seeded problem up and computes autograd's
answer (``prepare``: ``tasks`` for the lecture's exercises 1 to 4, ``zoo_exercises`` for the zoo's
layers, 5 to 8); the learner's file is run on the problem's inputs under ``guard``
(``run.run_exercise``: a ``.py`` is imported, a notebook's cells are run); and the checker grades
what it computed (``grade_answer``): a row per tensor in backward order, the first wrong one
named with a hint for a classic mistake (``grading``, ``hints``), and for exercise 4 a training
run replayed from the learner's gradients (``race``). Any error in the learner's file is reported
with its line number, never as a traceback of the checker.

``check`` does all three in this process; ``sandbox.check_in_child`` runs the learner's side in a
child process and grades what it sends back here: the verdict is always this module's.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

from ..checking import atomic
from ..data import Dataset, default_data_path
from ..errors import UserError
from . import exercises, zoo_exercises
from .answer import Answer
from .exercises import LECTURE, TITLES, check_number
from .grading import CheckResult, Task, explain_failure, grade
from .learner import LearnerError, PyFile, require_file
from .notebook_run import NotebookCode, open_notebook
from .race import TrainingPlan, make_plan, replay
from .run import run_exercise
from .tasks import make_task

SUFFIXES = (".py", ".ipynb")


@dataclass
class Problem:
    """One exercise set up for one file: the task (inputs and autograd's answer), the learner's
    code as messages name it, and exercise 4's training plan."""

    number: int
    path: Path
    task: Task
    code: object
    plan: TrainingPlan | None = None


def check_suffix(number: int, path: str | Path) -> None:
    """Only what the checker can load: a .py file or a notebook."""
    path = Path(path)
    if path.suffix not in SUFFIXES:
        raise UserError(f"{path}: exercise files are .py (a Python file) or .ipynb (a notebook), "
                        f"not {path.suffix or 'a name without a suffix'}; e.g. backprop-ninja "
                        f"exercise {number} --init ex{number}.py")


def prepare(number: int, path: str | Path, data_path: str | Path | None = None,
            setup: atomic.CheckSetup | None = None, data: Dataset | None = None) -> Problem:
    """The exercise's problem for the file at ``path``. A file the checker cannot load is a
    UserError; one of another exercise, or a broken notebook, a LearnerError."""
    check_number(number)
    path = Path(path)
    require_file(path)
    check_suffix(number, path)
    if path.suffix == ".ipynb":
        code = NotebookCode(open_notebook(number, path)[1])
    else:
        code = PyFile(path)
        refuse_other_exercise(number, path)
    plan = None
    if number in LECTURE:
        setup = setup or atomic.lecture_check_setup(data_path)
        task = make_task(number, setup)
        if number == 4:
            plan = make_plan(data or Dataset.load(data_path or default_data_path()), setup.cfg)
    else:
        task = zoo_exercises.TASKS[number]()
    return Problem(number, path, task, code, plan)


def refuse_other_exercise(number: int, path: Path) -> None:
    """A .py whose backward takes another exercise's arguments is that exercise's file: say so,
    rather than fail calling it (read, not run)."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
    except (SyntaxError, ValueError):
        return  # running it reports the error with its line
    found = [node for node in tree.body if isinstance(node, ast.FunctionDef) and
             node.name == "backward"]
    if not found:
        return
    arguments = [a.arg for a in found[-1].args.args]
    if arguments == exercises.template_parts(number).arguments:
        return
    for other in TITLES:
        if other != number and arguments == exercises.template_parts(other).arguments:
            raise LearnerError(f"{path} is exercise {other}'s file (its backward takes exercise "
                               f"{other}'s arguments); check it with: backprop-ninja exercise "
                               f"{other} --check {path}")


def grade_answer(problem: Problem, answer: Answer) -> CheckResult:
    """The verdict on what the learner's code computed (here, or sent back by the child)."""
    number, task, code = problem.number, problem.task, problem.code
    try:
        if answer.error is not None:
            raise explain_failure(LearnerError(answer.error, answer.partial), task, code)
        g = grade(task, answer.gradients, code)
        if number == 4:
            if not g.ok:
                g.messages.append("the training run waits until every gradient above is right")
            elif answer.training_error is not None:
                raise LearnerError(answer.training_error)
            else:
                race = replay(problem.plan, answer.training or {})
                g.extra_ok = race.ok
                g.messages.append(race.text())
    except LearnerError as e:
        return CheckResult(f"{TITLES[number]}\n{e}", False)
    return CheckResult(g.text(), g.ok, g)


def check(number: int, path: str | Path, data_path: str | Path | None = None,
          setup: atomic.CheckSetup | None = None, data: Dataset | None = None) -> CheckResult:
    """Grade the learner's file (``.py``, or ``.ipynb``) for one exercise, in this process; the
    text is what the command prints.

    ``setup`` (the lecture's check batch) and ``data`` (exercise 4's training data) are built from
    ``data_path`` unless given.
    """
    try:
        problem = prepare(number, path, data_path, setup, data)
    except LearnerError as e:
        return CheckResult(f"{TITLES[number]}\n{e}", False)
    task = problem.task
    answer = run_exercise(number, problem.path, task.inputs, task.names, problem.plan,
                          lambda gradients: grade(task, gradients, problem.code).ok)
    return grade_answer(problem, answer)
