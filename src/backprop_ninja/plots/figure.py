"""The one PNG writer: a figure rendered on the Agg canvas and renamed into place only once it is
complete, so a failed write never leaves half a picture (or half-overwrites a good one)."""

from __future__ import annotations

from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..errors import UserError
from ..rundir import atomic_write


def save(fig: Figure, out: str | Path) -> Path:
    out = Path(out)
    FigureCanvasAgg(fig)
    try:
        atomic_write(out, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    except OSError as e:
        raise UserError(f"cannot write {out}: {e.strerror or e}") from None
    return out
