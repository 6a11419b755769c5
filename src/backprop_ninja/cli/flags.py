"""The flags shared by several commands: every model's config fields, each a flag, with the rule
that a flag a model does not have is an error rather than silently ignored; and the work
directory. Light: building the parser imports no torch (``catalog``)."""

from __future__ import annotations

import argparse

from ..errors import UserError
from . import catalog

DEFAULT_WORKDIR = "out"
# every command that reads or writes a work directory takes each of these spellings
WORKDIR_FLAGS = ("-o", "--out-dir", "--work-dir", "--workdir")


def add_workdir_flag(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument(*WORKDIR_FLAGS, dest="out_dir", default=DEFAULT_WORKDIR, metavar="WORKDIR",
                   help=help)


def all_model_flags() -> dict[str, list[str]]:
    """Each config field of any model -> the model types that have it."""
    return catalog.model_flags()


def add_model_flags(p: argparse.ArgumentParser, default_note: str) -> None:
    for name, types in all_model_flags().items():
        defaults = ", ".join(f"{t} {catalog.MODELS[t][0][name]}" for t in types)
        text = f"{name.replace('_', ' ')}, by type: {defaults} {default_note}".rstrip()
        if name == "block_size":
            text += (f"; 0 for {', '.join(catalog.SEQUENCE_MODELS)}: automatic, the longest "
                     "item + 1")
        p.add_argument("--" + name.replace("_", "-"), type=int, default=None, help=text)


def model_flags(args: argparse.Namespace, spec) -> dict[str, int | None]:
    """The model flags given on the command line for ``spec`` (a ``models.base.ModelSpec``; None
    where not given); a flag that ``spec`` does not have is a one-line error."""
    for name, types in all_model_flags().items():
        if getattr(args, name) is not None and name not in spec.flags():
            own = ", ".join("--" + f.replace("_", "-") for f in spec.flags()) or "none"
            raise UserError(f"--{name.replace('_', '-')} does not apply to --type {spec.name} "
                            f"(it is a flag of {', '.join(types)}; {spec.name}'s model flags: {own})")
    return {name: getattr(args, name) for name in spec.flags()}
