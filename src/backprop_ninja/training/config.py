"""A run's training config: the recipe, the flags, and the one place where they merge.

A new run takes its model's recipe (``ModelSpec.recipe``) with the flags given over it; a
resumed run takes the config it recorded, with a field added since then at its default, and
refuses a flag that contradicts it (except ``--steps``, the total to train to).
"""

from __future__ import annotations

import math
from dataclasses import MISSING, asdict, dataclass, replace
from pathlib import Path

from ..errors import UserError
from ..rundir import bad_config
from .distill import DEFAULT_WEIGHT as DEFAULT_DISTILL
from .optim import OPTIMIZERS, OptimConfig

SCHEDULES = ("step", "cosine")


def flag(field: str) -> str:
    """The command-line flag of a TrainConfig field: lr_decay_to -> --lr-decay-to."""
    return "--" + field.replace("_", "-")


@dataclass(frozen=True)
class TrainConfig:
    """What defines a run's trajectory; all but ``steps`` must match when it is resumed. The
    defaults are each model's recipe (``ModelSpec.recipe``).

    The learning rate: a linear warm-up from 0 over ``warmup_steps``, then ``lr``; with the
    "step" schedule ``lr_decay_to`` from ``lr_decay_step`` on (the lecture's), with "cosine" a
    half cosine from ``lr`` down to ``lr_decay_to`` at ``lr_decay_step``, constant after it.
    """

    steps: int
    batch_size: int
    lr: float
    lr_decay_step: int
    lr_decay_to: float
    seed: int
    optimizer: str = "sgd"
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_schedule: str = "step"
    dropout: float = 0.0
    ema: float = 0.0
    sam: float = 0.0
    distill: float = 0.0  # the teachers' share of each target (with --teacher; see distill)

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if step >= self.lr_decay_step:
            return self.lr_decay_to
        if self.lr_schedule == "step":
            return self.lr
        progress = (step - self.warmup_steps) / max(1, self.lr_decay_step - self.warmup_steps)
        return self.lr_decay_to + 0.5 * (self.lr - self.lr_decay_to) * (1 + math.cos(math.pi * progress))

    def optim(self, no_decay: tuple[str, ...] = ()) -> OptimConfig:
        return OptimConfig(self.optimizer, self.weight_decay, ema=self.ema, no_decay=no_decay,
                           sam=self.sam)

    def validate(self, name=None) -> None:
        """A one-line error for the first bad field, named by ``name`` (default: its flag)."""
        name = name or flag
        if self.batch_size < 1:
            raise UserError(f"{name('batch_size')} must be at least 1, got {self.batch_size}")
        for key in ("steps", "lr_decay_step", "warmup_steps"):
            if getattr(self, key) < 0:
                raise UserError(f"{name(key)} must be 0 or more, got {getattr(self, key)}")
        for key in ("lr", "lr_decay_to"):
            value = getattr(self, key)
            if not (math.isfinite(value) and value > 0):
                raise UserError(f"{name(key)} must be a positive number, got {value}")
        if not (math.isfinite(self.weight_decay) and 0 <= self.weight_decay < 1):
            raise UserError(f"{name('weight_decay')} must be in [0, 1), got {self.weight_decay}")
        if self.optimizer not in OPTIMIZERS:
            raise UserError(f"{name('optimizer')} {self.optimizer} is not one of {', '.join(OPTIMIZERS)}")
        if not (math.isfinite(self.dropout) and 0 <= self.dropout < 1):
            raise UserError(f"{name('dropout')} must be at least 0 and below 1, got {self.dropout}")
        if not (math.isfinite(self.ema) and 0 <= self.ema < 1):
            raise UserError(f"{name('ema')} must be at least 0 and below 1, got {self.ema}: the weight of "
                            "the old average at each step (0.999 averages over ~1000 steps; 0: off)")
        if not (math.isfinite(self.distill) and 0 <= self.distill <= 1):
            raise UserError(f"{name('distill')} must be between 0 and 1, got {self.distill}: the teachers' "
                            "share of each target (0.5: half the label, half the teachers)")
        if not (math.isfinite(self.sam) and self.sam >= 0):
            raise UserError(f"{name('sam')} must be 0 (off) or more, got {self.sam}: the distance from the "
                            "parameters at which the step takes its gradient (e.g. 0.05)")
        if self.lr_schedule not in SCHEDULES:
            raise UserError(f"{name('lr_schedule')} {self.lr_schedule} is not one of {', '.join(SCHEDULES)}")


def new_config(recipe: dict, flags: dict, teachers: bool = False) -> TrainConfig:
    """A new run's config: the recipe with every flag given (not None) over it; with teachers,
    --distill defaults to DEFAULT_DISTILL."""
    given = {k: v for k, v in flags.items() if v is not None}
    if teachers:
        given.setdefault("distill", DEFAULT_DISTILL)
    tcfg = TrainConfig(**{**recipe, **given})
    tcfg.validate()
    return tcfg


def resumed_config(recorded: object, path: Path, flags: dict) -> TrainConfig:
    """A resumed run's config: the one recorded at ``path`` (config.json's "train"; fields
    added since the run was made take their defaults), each flag given checked against it, and
    --steps, if given, as the new total."""
    fields = TrainConfig.__dataclass_fields__
    required = {k for k, f in fields.items() if f.default is MISSING}
    kinds = {"int": (int,), "float": (int, float), "str": (str,)}
    if not isinstance(recorded, dict):
        raise bad_config(path, "the train section is not an object")
    unknown = sorted(set(recorded) - set(fields))
    if unknown:
        raise bad_config(path, f"train.{unknown[0]} is not a training field")
    missing = sorted(required - set(recorded))
    if missing:
        raise bad_config(path, f"train.{missing[0]} is missing")
    for key, value in recorded.items():
        kind = str(fields[key].type)
        if not isinstance(value, kinds[kind]) or isinstance(value, bool):
            raise bad_config(path, f"train.{key} is {value!r}, not a{'n' if kind == 'int' else ''} "
                                   f"{kind}")
    tcfg = TrainConfig(**recorded)
    tcfg.validate(name=lambda key: f"{path}: train.{key}")
    check_same(asdict(tcfg), {k: v for k, v in flags.items() if k != "steps"})
    if flags.get("steps") is not None:
        tcfg = replace(tcfg, steps=flags["steps"])
        tcfg.validate()
    return tcfg


def check_same(recorded: dict, flags: dict) -> None:
    """Each flag given (not None) must equal what the run recorded."""
    for key, value in flags.items():
        if value is not None and recorded.get(key) != value:
            raise UserError(f"{flag(key)} {value} differs from the run being resumed "
                            f"({recorded.get(key)}); drop {flag(key)} to resume it, or train into "
                            "a new -o WORKDIR")
