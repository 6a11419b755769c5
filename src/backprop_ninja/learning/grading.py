"""Grading: a row per tensor against autograd's gradient, the first wrong one named with advice,
and the result a check prints.

Dimension letters: n batch, T block_size, E n_embd, H n_hidden, V vocab size.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Mapping

from torch import Tensor

from ..checking.gradcheck import Comparison, compare, format_table
from .hints import Context, passing_notes
from .learner import Alternatives, LearnerError, call_learner, refuse_graph_tensors


@dataclass
class Grade:
    """The graded rows of one exercise, and what to tell the learner about them."""

    title: str
    rows: list[Comparison]
    messages: list[str] = field(default_factory=list)
    extra_ok: bool = True  # exercise 4's training run

    @property
    def ok(self) -> bool:
        return self.extra_ok and all(r.approx for r in self.rows)

    def text(self) -> str:
        return "\n".join([format_table(self.rows, self.title), *self.after_table()])

    def after_table(self) -> list[str]:
        """The lines under the table (a notebook draws the table itself)."""
        n_ok = sum(r.approx for r in self.rows)
        lines = [*self.messages, f"{n_ok}/{len(self.rows)} gradients match autograd"]
        return lines + (["all correct: well done"] if self.ok else [])


def grade(task: Task, got: Mapping, code) -> Grade:
    ctx = dataclasses.replace(task.ctx, got=dict(got))
    rows = [compare(name, ctx.got.get(name), ctx.ref[name]) for name in task.names]
    g = Grade(task.title, rows)
    wrong = [r for r in rows if not r.approx]
    if wrong:
        first = wrong[0]
        g.messages.append(f"\nfirst wrong: d{first.name} (the rows after it usually inherit its "
                          "error; fix it first)")
        g.messages.append("  " + code.advice(first.name, ctx, task.names, task.alternatives))
    g.messages += [f"note: {m}" for m in passing_notes(ctx, task.names)]
    return g


def call_and_grade(task: Task, fn: Callable, code) -> Grade:
    """Grade what backward returns."""
    try:
        got = call_learner(fn, code, task.inputs)
    except LearnerError as e:
        raise explain_failure(e, task, code) from None
    return grade(task, got, code)


def explain_failure(e: LearnerError, task: Task, code) -> LearnerError:
    """The learner's code raised: if a gradient it had already computed is wrong, say so (a wrong
    shape often only fails a few lines later); otherwise the error as it is."""
    ctx = dataclasses.replace(task.ctx, got=dict(e.partial))
    wrong = [name for name in task.names if name in e.partial
             and not compare(name, e.partial[name], ctx.ref[name]).approx]
    if not wrong:
        return e
    advice = code.advice(wrong[0], ctx, task.names, task.alternatives)
    return LearnerError(f"{e}\nbefore that line, d{wrong[0]} was already wrong:\n  {advice}")


def grade_gradients(task: Task, gradients: Mapping, code) -> Grade:
    """Grade gradients computed elsewhere (a notebook's cells) exactly as backward's are."""
    refuse_graph_tensors(gradients, "the gradients passed to check() hold")
    return grade(task, gradients, code)


@dataclass
class CheckResult:
    """What a check prints (``text``), whether every row matched, the graded rows when there are
    any (a notebook draws them as a table), and what the learner's code printed in a child."""

    text: str
    ok: bool
    grade: Grade | None = None
    output: str = ""

    def __repr__(self) -> str:  # a notebook shows the table already; this only sums it up
        return f"<CheckResult ok={self.ok}: {self.text.splitlines()[-1]}>"


@dataclass
class Task:
    """One exercise on the check batch: the tensors its backward gets, autograd's gradients (in
    ``ctx``), the rows to grade in backward order, and the recognisable mistakes."""

    title: str
    names: tuple[str, ...]
    inputs: dict[str, Tensor]
    ctx: Context
    alternatives: Alternatives
