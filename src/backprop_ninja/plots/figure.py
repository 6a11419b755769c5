"""The one PNG writer: a figure rendered on the Agg canvas and renamed into place only once it is
complete, so a failed write never leaves half a picture (or half-overwrites a good one).

It writes only where a picture belongs: into an existing folder, and over an existing file only
when that file is a PNG (a picture this writer made before) or when the caller says ``force``.
A mistyped ``--out`` never replaces a run's config.json or a learner's .py file, and never
creates folders."""

from __future__ import annotations

from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..errors import UserError
from ..rundir import atomic_write

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def is_png(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(PNG_SIGNATURE)) == PNG_SIGNATURE
    except OSError:
        return False


def check_target(out: Path, force: bool = False) -> None:
    """A one-line error unless ``out`` is a place to write a PNG: its folder exists, and it is
    not an existing file other than a PNG (unless ``force``)."""
    parent = out.parent
    if not parent.is_dir():
        raise UserError(f"cannot write {out}: the folder {parent} does not exist; create it "
                        "first, or pass --out in an existing folder")
    if out.is_dir():
        raise UserError(f"{out} is a directory; pass --out FILE.png")
    if out.exists() and not force and not is_png(out):
        raise UserError(f"{out} exists and is not a PNG; it is left as it is: pass another "
                        "--out, or add --force to replace it")


def save(fig: Figure, out: str | Path, force: bool = False) -> Path:
    out = Path(out)
    check_target(out, force)
    FigureCanvasAgg(fig)
    try:
        atomic_write(out, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    except OSError as e:
        raise UserError(f"cannot write {out}: {e.strerror or e}") from None
    return out
