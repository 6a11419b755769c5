"""The notebook's side of a check: ``exercise_inputs`` and ``check``, which a notebook's cells
import.

``check(N, {"logprobs": dlogprobs, ...})`` grades tensors passed to it (never the notebook's
globals, never a ``.grad``) against a reference it computes itself from the seeded check batch,
with the grading of ``--check`` (``grading.grade_gradients``), and shows the same table: HTML in
Jupyter, text elsewhere. Writing notebooks is ``notebook_build``'s job, grading a saved one
without Jupyter ``notebook_run``'s.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Mapping

from torch import Tensor

from .exercises import TITLES, check_number
from .grading import CheckResult, grade_gradients
from .learner import LearnerError
from .notebook_run import Session, session
from .race import grade_function


def exercise_inputs(number: int, data_path: str | Path | None = None) -> dict[str, Tensor]:
    """Every tensor the exercise's backward gets, by name, on the lecture's seeded check batch:
    copies, so editing them cannot change what the check compares with."""
    check_number(number)
    task = session(data_path).task(number)
    return {name: value.clone() for name, value in task.inputs.items()}


def check(number: int, answer, data_path: str | Path | None = None) -> CheckResult:
    """Grade your gradients: ``check(1, {"logprobs": dlogprobs, ...})`` (exercises 1-3), or your
    function: ``check(4, backward)``. Shows the table (HTML in Jupyter) and returns the result."""
    check_number(number)
    s = session(data_path)
    result = grade_answer(number, answer, s)
    if s.headless:
        s.results.append((number, result))
    else:
        show(result)
    return result


def grade_answer(number: int, answer, s: Session) -> CheckResult:
    task = s.task(number)
    try:
        if callable(answer):
            code_ = s.code(answer)
            data = s.dataset() if number == 4 else None
            grade = grade_function(number, answer, code_, task, s.check_setup(), data)
        elif number == 4:
            raise LearnerError("exercise 4 trains the network with your backward on new "
                               "batches: pass the function itself, check(4, backward)")
        elif isinstance(answer, Mapping):
            grade = grade_gradients(task, answer, s.code(None))
        else:
            raise LearnerError(f"check({number}, ...) takes a dict from each tensor's name to its "
                               f"gradient, e.g. {{\"logits\": dlogits}}, not a "
                               f"{type(answer).__name__}")
    except LearnerError as e:
        return CheckResult(f"{TITLES[number]}\n{e}", False)
    return CheckResult(grade.text(), grade.ok, grade)


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
    """The check's table in HTML (tensor, shape, exact, approx, maxdiff) and its messages."""
    g = result.grade
    if g is None:
        return f"<pre>{html.escape(result.text)}</pre>"
    title, *more = g.title.split("\n")
    rows = "".join(row_html(r) for r in g.rows)
    head = "".join(f"<th>{h}</th>" for h in ("tensor", "shape", "exact", "approx", "maxdiff"))
    tail = "\n".join(g.after_table()).strip()
    return (f"<p><b>{html.escape(title)}</b>{''.join('<br>' + html.escape(m) for m in more)}</p>"
            f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"
            f"<pre>{html.escape(tail)}</pre>")


def row_html(r) -> str:
    style = "" if r.approx else ' style="background-color: rgba(255, 0, 0, 0.15)"'
    if r.problem is not None:
        shape, exact, approx, diff = "-", "-", "-", f"d{r.name} {r.problem}"
    elif not r.shape_ok:
        shape = f"{list(r.shape)}, expected {list(r.expected_shape)}"
        exact, approx, diff = "False", "False", "-"
    else:
        shape, exact, approx, diff = str(list(r.shape)), str(r.exact), str(r.approx), \
            f"{r.maxdiff:.3g}"
    cells = "".join(f"<td>{html.escape(c)}</td>" for c in (r.name, shape, exact, approx, diff))
    return f"<tr{style}>{cells}</tr>"
