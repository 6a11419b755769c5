"""The model flags shared by train and check: every model's config fields, each a flag, and the
rule that a flag a model does not have is an error rather than silently ignored."""

from __future__ import annotations

import argparse

from .. import models
from ..errors import UserError
from ..models.base import ModelSpec

DEFAULT_WORKDIR = "out"
# every command that reads or writes a work directory takes each of these spellings
WORKDIR_FLAGS = ("-o", "--out-dir", "--work-dir", "--workdir")


def add_workdir_flag(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument(*WORKDIR_FLAGS, dest="out_dir", default=DEFAULT_WORKDIR, metavar="WORKDIR",
                   help=help)


def all_model_flags() -> dict[str, list[str]]:
    """Each config field of any model -> the model types that have it."""
    out: dict[str, list[str]] = {}
    for spec in models.MODELS.values():
        for name in spec.flags():
            out.setdefault(name, []).append(spec.name)
    return out


def add_model_flags(p: argparse.ArgumentParser, default_note: str) -> None:
    for name, types in all_model_flags().items():
        defaults = ", ".join(f"{t} {models.MODELS[t].defaults()[name]}" for t in types)
        p.add_argument("--" + name.replace("_", "-"), type=int, default=None,
                       help=f"{name.replace('_', ' ')} ({defaults}) {default_note}".rstrip())


def model_flags(args: argparse.Namespace, spec: ModelSpec) -> dict[str, int | None]:
    """The model flags given on the command line for ``spec`` (None where not given); a flag
    that ``spec`` does not have is a one-line error."""
    for name, types in all_model_flags().items():
        if getattr(args, name) is not None and name not in spec.flags():
            own = ", ".join("--" + f.replace("_", "-") for f in spec.flags()) or "none"
            raise UserError(f"--{name.replace('_', '-')} does not apply to --type {spec.name} "
                            f"(it is a flag of {', '.join(types)}; {spec.name}'s model flags: {own})")
    return {name: getattr(args, name) for name in spec.flags()}
