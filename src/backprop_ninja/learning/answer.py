"""What the learner's code answered, and how it travels from the check's child process to the
checker: tensors and a few lines of text, never a verdict.

An ``Answer`` holds the gradients their code returned on the check batch (or the error it raised,
with the gradients it had computed by then) and, for exercise 4, the gradients of each step of
its training run. The child writes it as a safetensors file (tensors, and text in the file's
metadata); the checker reads it back without unpickling anything and grades it itself. A value
that is not a tensor safetensors can hold travels as a description, and comes back as a
stand-in that the grading refuses the same way (``gradcheck.gradient_problem``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

MAX_BYTES = 512 * 2**20  # far above any exercise's answer (exercise 4's run: about 10 MB)


@dataclass
class Answer:
    gradients: dict[str, object] = field(default_factory=dict)  # by tensor name, as returned
    error: str | None = None        # their code raised (already phrased, with its line)
    partial: dict[str, Tensor] = field(default_factory=dict)    # computed before it raised
    training: dict[str, Tensor] | None = None  # exercise 4: each step's gradients, stacked
    training_error: str | None = None


class Unreadable(Exception):
    """The child's answer is missing, malformed or not the one asked for."""


def sendable(value: object) -> bool:
    return isinstance(value, Tensor) and value.device.type == "cpu" and not value.is_sparse


def describe(value: object) -> dict:
    """A value safetensors cannot hold, as what grading needs to refuse it in the same words."""
    if value is None:
        return {"none": True}
    if isinstance(value, Tensor):
        return {"dtype": str(value.dtype).removeprefix("torch."), "shape": list(value.shape),
                "device": str(value.device)}
    kind = type(value)
    return {"module": kind.__module__, "type": kind.__name__}


def stand_in(desc: dict) -> object:
    if desc.get("none"):
        return None
    if "dtype" in desc:
        dtype = getattr(torch, desc["dtype"], torch.float32)
        try:
            return torch.empty(desc["shape"], dtype=dtype, device=desc["device"])
        except (RuntimeError, TypeError, ValueError):
            return torch.empty(desc["shape"], dtype=dtype, device="meta")
    return type(str(desc["type"]), (), {"__module__": str(desc["module"])})()


def save_answer(path: Path, answer: Answer, token: str) -> None:
    """Write ``answer`` to ``path`` (the child's side), marked with the checker's ``token``."""
    from safetensors.torch import save_file

    tensors: dict[str, Tensor] = {}
    others: dict[str, dict] = {}
    for group, values in (("check", answer.gradients), ("partial", answer.partial),
                          ("training", answer.training or {})):
        for name, value in values.items():
            key = f"{group}/{name}"
            if sendable(value):
                tensors[key] = value.detach().clone(memory_format=torch.contiguous_format)
            else:
                others[key] = describe(value)
    meta = {"token": token, "others": json.dumps(others),
            "error": json.dumps(answer.error), "training_error": json.dumps(answer.training_error),
            "trained": json.dumps(answer.training is not None)}
    save_file(tensors, str(path), metadata=meta)


def load_answer(path: Path, token: str, names: tuple[str, ...]) -> Answer:
    """Read the child's answer (the checker's side): only tensors and text, only the names the
    exercise grades; anything else is ``Unreadable``."""
    from safetensors import safe_open

    if not path.is_file():
        raise Unreadable("it wrote no answer")
    if path.stat().st_size > MAX_BYTES:
        raise Unreadable(f"its answer is over {MAX_BYTES // 2**20} MB")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("token") != token:
                raise Unreadable("its answer is not the one the checker asked for")
            others = json.loads(meta["others"])
            error, training_error = json.loads(meta["error"]), json.loads(meta["training_error"])
            trained = json.loads(meta["trained"])
            answer = Answer(error=text_or_none(error), training_error=text_or_none(training_error),
                            training={} if trained is True else None)
            keys = set(f.keys()) | set(others)
            for key in keys:
                group, _, name = key.partition("/")
                graded = name in names or name.startswith("d") and name[1:] in names
                if not graded or group not in ("check", "partial", "training"):
                    continue
                value = f.get_tensor(key) if key in f.keys() else stand_in(others[key])
                target = {"check": answer.gradients, "partial": answer.partial,
                          "training": answer.training}[group]
                if target is not None and (group != "training" or isinstance(value, Tensor)):
                    target[name] = value
    except Unreadable:
        raise
    except Exception as e:  # a malformed file: safetensors, json or a key missing
        raise Unreadable(f"its answer is malformed ({type(e).__name__})") from None
    return answer


def text_or_none(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise Unreadable("its answer is malformed (text expected)")
    return value
