"""The learner's side of a check: run their file (a ``.py`` or a notebook) on the inputs the
checker gives, under ``guard``, to an ``Answer``: the gradients it returned, or the error it
raised, and for exercise 4 each step of its training run. Nothing here knows the right answer:
the check's child process runs this and the checker grades what it sends back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping

from torch import Tensor

from . import notebook_run, race
from .answer import Answer
from .learner import LearnerError, PyFile, call_learner, learner_function, load_learner, \
    refuse_graph_tensors


def run_exercise(number: int, path: str | Path, inputs: dict[str, Tensor],
                 names: tuple[str, ...], plan: race.TrainingPlan | None = None,
                 should_train: Callable[[Mapping], bool] | None = None) -> Answer:
    """Run exercise ``number``'s file on ``inputs``; ``names``: the tensors it is graded on.
    With a ``plan`` (exercise 4), train with the learner's backward when ``should_train`` says
    the check batch's gradients are worth it."""
    path = Path(path)
    try:
        if path.suffix == ".ipynb":
            given, code = notebook_run.run_notebook(number, path, inputs, names)
        else:
            code = PyFile(path)
            given = learner_function(load_learner(path), path)
        if callable(given):
            fn = given
            gradients = call_learner(fn, code, inputs)
        else:
            fn = None
            gradients = passed_gradients(number, given)
    except LearnerError as e:
        return Answer(error=str(e), partial=dict(e.partial))
    answer = Answer(gradients=graded_keys(gradients, names))
    if plan is not None and fn is not None and (should_train or race.complete)(answer.gradients):
        try:
            answer.training = race.learner_run(fn, code, plan)
        except LearnerError as e:
            answer.training_error = str(e)
    return answer


def graded_keys(gradients: Mapping, names: tuple[str, ...]) -> dict:
    """The gradients of ``names``, and a key spelt ``d<name>`` (the hints say how to key it)."""
    return {k: v for k, v in gradients.items()
            if k in names or isinstance(k, str) and k[1:] in names and k.startswith("d")}


def passed_gradients(number: int, given: object) -> dict:
    """What a notebook's check cell passed instead of a function: a dict of gradients."""
    if number == 4:
        raise LearnerError("exercise 4 trains the network with your backward on new batches: "
                           "pass the function itself, check(4, backward)")
    if not isinstance(given, Mapping):
        raise LearnerError(f"check({number}, ...) takes a dict from each tensor's name to its "
                           f"gradient, e.g. {{\"logits\": dlogits}}, not a "
                           f"{type(given).__name__}")
    refuse_graph_tensors(given, "the gradients passed to check() hold")
    return dict(given)
