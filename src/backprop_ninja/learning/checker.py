"""The checker of the exercises: it grades a learner's file against autograd.

A starter file (see ``exercises``) holds the forward pass, done, and a ``backward`` function whose
gradients are blanks. ``check`` picks how to run the file (a ``.py`` is imported, a notebook's
cells are run: ``notebook_run``), calls its ``backward`` on the exercise's seeded problem with
autograd forbidden (``learner``) and grades each returned gradient against autograd's, in
backward order (``grading``). It names the first wrong tensor (the ones after it usually inherit
its error) and, when it recognises a classic mistake, says which (see ``hints``). Exercise 4 then
trains with it (``race``); exercises 5 to 8 are the zoo's layers (``zoo_exercises``).

``sandbox.check_in_child`` runs this same ``check`` in a child process with a time and a memory
limit; a notebook's ``check(N, ...)`` grades tensors passed to it (``notebook``).
"""

from __future__ import annotations

from pathlib import Path

from ..checking import atomic
from ..data import Dataset, default_data_path
from ..errors import UserError
from .exercises import LECTURE, TITLES, check_number
from .grading import CheckResult
from .learner import LearnerError, PyFile, learner_function, load_learner
from .notebook_run import check_notebook
from .race import grade_function
from .tasks import make_task
from .zoo_exercises import check_zoo


def check(number: int, path: str | Path, data_path: str | Path | None = None,
          setup: atomic.CheckSetup | None = None, data: Dataset | None = None) -> CheckResult:
    """Grade the learner's file (``.py``, or ``.ipynb``: see ``notebook``) for one exercise, in
    this process; the text is what the command prints.

    ``setup`` (the lecture's check batch) and ``data`` (exercise 4's training data) are built from
    ``data_path`` unless given.
    """
    check_number(number)
    path = Path(path)
    if number not in LECTURE:  # the zoo's layers: a problem of their own, no lecture batch
        if path.suffix == ".ipynb":
            raise UserError(f"exercise {number} comes as a .py file for now (notebooks are for "
                            f"exercises 1 to 4); start one with: backprop-ninja exercise {number} "
                            "--init FILE.py")
        return check_zoo(number, path)
    if path.suffix == ".ipynb":
        return check_notebook(number, path, data_path, setup, data)
    try:
        fn = learner_function(load_learner(path), path)
        setup = setup or atomic.lecture_check_setup(data_path)
        if number == 4:
            data = data or Dataset.load(data_path or default_data_path())
        grade_ = grade_function(number, fn, PyFile(path), make_task(number, setup), setup, data)
    except LearnerError as e:
        return CheckResult(f"{TITLES[number]}\n{e}", False)
    return CheckResult(grade_.text(), grade_.ok, grade_)
