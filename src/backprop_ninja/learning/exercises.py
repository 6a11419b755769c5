"""The lecture's four exercises as files: a template per exercise (``templates/exerciseN.py``)
renders into the learner's starter and into the solution.

A template is the solution with each blank's answer fenced between
``# BLANK d<name>: <forward line>`` and ``# END``: the starter replaces a fence by
``d<name> = None  # TODO: <forward line>``, the solution drops the fences.
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

from ..errors import UserError

TITLES = {
    1: "exercise 1: the atomic backward, all 26 tensors",
    2: "exercise 2: the fused cross-entropy backward, dlogits",
    3: "exercise 3: the fused batchnorm backward, dhprebn",
    4: "exercise 4: your backward trains the network",
}
BLANK_RE = re.compile(r"^(\s*)# BLANK (d\w+): (.*)$")
END_RE = re.compile(r"^\s*# END\s*$")



def template_text(number: int) -> str:
    check_number(number)
    return (resources.files("backprop_ninja.learning.templates") / f"exercise{number}.py").read_text()


def render(text: str, solution: bool) -> str:
    """The starter (each fenced answer replaced by a blank) or the solution (fences dropped)."""
    out: list[str] = []
    in_blank = False
    for line in text.splitlines():
        blank = BLANK_RE.match(line)
        if blank:
            indent, name, forward_line = blank.groups()
            if not solution:
                out.append(f"{indent}{name} = None  # TODO: {forward_line}")
            in_blank = True
        elif END_RE.match(line):
            in_blank = False
        elif solution or not in_blank:
            out.append(line)
    return "\n".join(out) + "\n"


def starter_text(number: int) -> str:
    return render(template_text(number), solution=False)


def solution_text(number: int) -> str:
    return render(template_text(number), solution=True)


def write_starter(number: int, path: str | Path, force: bool = False) -> Path:
    path = Path(path)
    if path.exists() and not force:
        raise UserError(f"{path} already exists; pick another file name, "
                        "or pass --force to overwrite it")
    if path.exists() and not path.is_file():
        raise UserError(f"{path} is not a regular file; pick a file name for the starter")
    try:
        path.write_text(starter_text(number))
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror}") from None
    return path


def check_number(number: int) -> None:
    if number not in TITLES:
        raise UserError(f"there are exercises 1 to 4, not {number}")
