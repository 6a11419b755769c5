"""The lecture's four exercises as files: a template per exercise (``templates/exerciseN.py``)
renders into the learner's starter and into the solution.

A template is the solution with each blank's answer fenced between
``# BLANK d<name>: <forward line>`` and ``# END``: the starter replaces a fence by
``d<name> = None  # TODO: <forward line>``, the solution drops the fences. ``template_parts``
cuts a template into the pieces a notebook is built from (``notebook``), so the ``.py`` template
stays the one source of both.
"""

from __future__ import annotations

import ast
import re
import textwrap
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ..errors import UserError

TITLES = {
    1: "exercise 1: the atomic backward, all 26 tensors",
    2: "exercise 2: the fused cross-entropy backward, dlogits",
    3: "exercise 3: the fused batchnorm backward, dhprebn",
    4: "exercise 4: your backward trains the network",
    5: "exercise 5: the fused layer normalisation backward",
    6: "exercise 6: the causal self-attention backward",
    7: "exercise 7: the WaveNet's batchnorm backward over dims (0, 1)",
    8: "exercise 8: an RNN's backward through time",
}
LECTURE = (1, 2, 3, 4)  # the lecture's exercises, on its check batch; 5-8 are the zoo's layers
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
                out.append(indent + blank_line(name, forward_line))
            in_blank = True
        elif END_RE.match(line):
            in_blank = False
        elif solution or not in_blank:
            out.append(line)
    return "\n".join(out) + "\n"


def blank_line(name: str, forward_line: str) -> str:
    """The learner's blank, the same in a starter file and in a notebook cell."""
    return f"{name} = None  # TODO: {forward_line}"


def starter_text(number: int) -> str:
    return render(template_text(number), solution=False)


def solution_text(number: int) -> str:
    return render(template_text(number), solution=True)


def write_starter(number: int, path: str | Path, force: bool = False,
                  solution: bool = False) -> Path:
    """The starter file (or, with ``solution``, the solved one) at ``path``."""
    return write_new(path, solution_text(number) if solution else starter_text(number), force)


def write_new(path: str | Path, text: str, force: bool) -> Path:
    """Write ``text`` to ``path``, refusing to overwrite the learner's work unless forced."""
    path = Path(path)
    if path.exists() and not force:
        raise UserError(f"{path} already exists; pick another file name, "
                        "or pass --force to overwrite it")
    if path.exists() and not path.is_file():
        raise UserError(f"{path} is not a regular file; pick a file name for the starter")
    try:
        path.write_text(text)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror}") from None
    return path


def check_number(number: int) -> None:
    if number not in TITLES:
        raise UserError(f"there are exercises 1 to {max(TITLES)}, not {number}")


# ---------------------------------------------------------------------------------------------
# a template cut into pieces, for the notebook

@dataclass(frozen=True)
class Blank:
    """One fenced answer: the gradient's variable, the forward line it comes from, the answer."""

    name: str             # d<name>
    forward_line: str
    answer: str           # the fenced lines, dedented

    def text(self, solution: bool) -> str:
        return self.answer if solution else blank_line(self.name, self.forward_line)


@dataclass(frozen=True)
class TemplateParts:
    """The pieces of a template: its docstring, imports, forward, and backward cut at the blanks."""

    docstring: str
    imports: list[str]
    forward: str                      # the forward function's source
    backward: str                     # backward's source, fences and all (``render`` it)
    arguments: list[str]              # backward's parameters, in order
    preamble: str                     # backward's lines before its first blank, dedented
    blanks: list[Blank]
    returned: list[tuple[str, str]]   # (tensor name, gradient variable), as backward returns them


def template_parts(number: int) -> TemplateParts:
    text = template_text(number)
    tree, lines = ast.parse(text), text.splitlines()
    functions = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    forward, backward = functions["forward"], functions["backward"]
    # the imports, at the top or in the try that says how to run the file without torch
    top = [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)] + \
        [n for t in tree.body if isinstance(t, ast.Try) for n in t.body
         if isinstance(n, ast.Import | ast.ImportFrom)]
    imports = [ast.get_source_segment(text, n) for n in sorted(top, key=lambda n: n.lineno)]
    body_start = first_body_line(backward, lines)
    returned_node = backward.body[-1]
    preamble, blanks = cut_at_blanks(lines[body_start:returned_node.lineno - 1], number)
    return TemplateParts(ast.get_docstring(tree) or "", imports, source_of(forward, lines),
                         source_of(backward, lines), [a.arg for a in backward.args.args],
                         preamble, blanks, returned_pairs(returned_node, number))


def source_of(node: ast.FunctionDef, lines: list[str]) -> str:
    return "\n".join(lines[node.lineno - 1:node.end_lineno])


def first_body_line(fn: ast.FunctionDef, lines: list[str]) -> int:
    """The index of the first line of fn's body, with the comments just above its first statement
    (a template's first blank may open the body)."""
    start = fn.body[0].lineno - 1
    while start - 1 >= fn.lineno and lines[start - 1].strip().startswith("#"):
        start -= 1
    return start


def cut_at_blanks(lines: list[str], number: int) -> tuple[str, list[Blank]]:
    """backward's body (without its return) as the lines before the first blank and the blanks."""
    preamble: list[str] = []
    blanks: list[Blank] = []
    current: tuple[str, str, list[str]] | None = None
    for line in lines:
        start, end = BLANK_RE.match(line), END_RE.match(line)
        if start:
            current = (start.group(2), start.group(3), [])
        elif end and current:
            name, forward_line, answer = current
            blanks.append(Blank(name, forward_line, textwrap.dedent("\n".join(answer))))
            current = None
        elif current:
            current[2].append(line)
        elif line.strip() and blanks:
            raise ValueError(f"template {number}: code between two blanks: {line.strip()}")
        elif line.strip():
            preamble.append(line)
    return textwrap.dedent("\n".join(preamble)), blanks


def returned_pairs(node: ast.stmt, number: int) -> list[tuple[str, str]]:
    """backward's ``return dict(name=dname, ...)`` or ``return {"name": dname}`` as pairs."""
    value = node.value if isinstance(node, ast.Return) else None
    if isinstance(value, ast.Call) and getattr(value.func, "id", None) == "dict":
        return [(k.arg, k.value.id) for k in value.keywords]
    if isinstance(value, ast.Dict):
        return [(k.value, v.id) for k, v in zip(value.keys, value.values)]
    raise ValueError(f"template {number}: backward must end by returning a dict of gradients")
