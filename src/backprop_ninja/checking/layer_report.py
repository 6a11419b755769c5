"""The report of ``check_layer``: a row per check, a column per input, then the diagnosis."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from .gradcheck import APPROX_ATOL, APPROX_RTOL


@dataclass
class Cell:
    """One input's gradient in one check: "ok", "wrong" or "error", the max abs difference from
    the oracle, and what is wrong when it is not a difference in values."""

    status: str
    maxdiff: float | None
    text: str | None

    def short(self) -> str:
        if self.status == "ok":
            return "ok" if self.maxdiff is None else f"ok {self.maxdiff:.1e}"
        if self.status == "error":
            return "ERROR"
        if self.maxdiff is not None:
            return f"WRONG {self.maxdiff:.2g}"
        if self.text and self.text.startswith("shape"):
            return f"WRONG {self.text.split(', expected')[0]}"
        return "WRONG"


@dataclass
class Check:
    label: str
    cells: dict[str, Cell]
    skipped: str | None = None
    # what the diagnosis needs (not reported)
    values: dict[str, Any] | None = field(default=None, repr=False)
    dout: Any = field(default=None, repr=False)
    got: dict[str, Any] | None = field(default=None, repr=False)
    truth: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        return all(c.status == "ok" for c in self.cells.values())


@dataclass
class Report:
    layer: str
    kind: str
    inputs: dict[str, str]
    out_shape: tuple[int, ...]
    oracles: list[str]
    batch: list[str]
    checks: list[Check]
    diagnosis: dict[str, str]       # input name (or "dout") -> what is wrong, in words
    notes: list[str]
    floats: list[str]

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def wrong(self) -> list[str]:
        return list(self.diagnosis)

    def text(self) -> str:
        inputs = ", ".join(f"{k} {v}" for k, v in self.inputs.items())
        lines = [f"check-layer: {self.layer} ({self.kind})",
                 f"inputs: {inputs}; output {list(self.out_shape)}"
                 + (f"; batch inputs: {', '.join(self.batch)}" if self.batch else ""),
                 f"oracles: {'; '.join(self.oracles)}",
                 f"approximately equal: max|mine - oracle| <= {APPROX_ATOL:g} + {APPROX_RTOL:g}"
                 " * max|oracle|", ""]
        cols = list(self.floats) + (["dout"] if any("dout" in c.cells for c in self.checks)
                                    else [])
        cells = [[c.cells[k].short() if k in c.cells else ("skipped" if c.skipped else "-")
                  for k in cols] for c in self.checks]
        w0 = max(len(c.label) for c in self.checks)
        widths = [max([len(k)] + [len(row[i]) for row in cells]) for i, k in enumerate(cols)]
        lines.append(" | ".join([f"{'check':<{w0}}"] + [f"{k:<{w}}" for k, w in zip(cols, widths)]))
        for c, row in zip(self.checks, cells):
            line = " | ".join([f"{c.label:<{w0}}"] + [f"{t:<{w}}" for t, w in zip(row, widths)])
            lines.append(line.rstrip() + (f"  ({c.skipped})" if c.skipped else ""))
        lines.append("")
        for k, text in self.diagnosis.items():
            lines.append(f"{k}: {text}")
        lines += [f"note: {n}" for n in self.notes]
        n_wrong = len([k for k in self.diagnosis if k != "dout"])
        lines.append("all gradients match" if self.ok else
                     f"WRONG: {n_wrong} of {len(self.floats)} gradients"
                     + (" (and dout changed in place)" if "dout" in self.diagnosis else ""))
        return "\n".join(lines)

    __str__ = text

    def as_dict(self) -> dict:
        def cell(c: Cell) -> dict:
            return {"status": c.status,
                    "maxdiff": None if c.maxdiff is None or math.isnan(c.maxdiff) else c.maxdiff,
                    "text": c.text}
        return {"layer": self.layer, "kind": self.kind, "inputs": self.inputs,
                "output_shape": list(self.out_shape), "oracles": self.oracles,
                "batch_inputs": self.batch, "ok": self.ok,
                "checks": [{"check": c.label, "ok": c.ok, "skipped": c.skipped,
                            "gradients": {k: cell(v) for k, v in c.cells.items()}}
                           for c in self.checks],
                "diagnosis": self.diagnosis, "notes": self.notes,
                "tolerance": {"atol": APPROX_ATOL, "rtol": APPROX_RTOL}}

    def json(self) -> str:
        return json.dumps(self.as_dict(), indent=2)
