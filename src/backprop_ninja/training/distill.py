"""Distillation: a student trained towards its teachers' predictions as well as the labels.

A teacher is a trained run on the same file and split (``--teacher WORKDIR ...``). Before the
first step its model predicts a distribution over the next character at every position of every
training item; with several teachers their distributions are averaged (an ensemble, usually
better than any of its members). Each step's target is then the mixture

    q = (1 - alpha) onehot(y) + alpha t        (alpha: --distill)

and its loss the cross-entropy -sum_v q_v log p_v, whose gradient with respect to the logits is
(p - q) / count: the lecture's dlogits with a softer target (``nn.losses``). The label says which
character came; the teacher adds how likely the others were, which one item alone cannot say.

The teachers' predictions are computed once, in chunks with every core, and kept for the whole
training set (N x T x V floats: 44 MB for the names); when that table would take more than
``MAX_BYTES`` they are computed per batch instead, a forward per teacher per step. A run records each teacher's directory and
the SHA-256 of its model file; a resume recomputes the predictions from the same files, so it
stays bit-exact, and refuses a teacher that has changed.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from ..errors import UserError
from ..nn.losses import SoftTargets
from .. import rundir
from .threads import all_threads

DEFAULT_WEIGHT = 0.5  # --distill when --teacher is given alone
MAX_BYTES = 2 << 30   # the teachers' prediction table over the training set, at most
TABLE_CHUNK = 4096


class Teacher(NamedTuple):
    """The teachers' mean predictions at every training position, and their share alpha of the
    target."""

    probs: Tensor   # N x T x V, rows of X's training examples
    weight: float

    def batch(self, ix: Tensor) -> SoftTargets:
        return SoftTargets(self.probs[ix], self.weight)


class BatchTeacher(NamedTuple):
    """The same targets, computed per batch (each teacher's cache-free forward on the batch's
    rows) when the N x T x V table would take more than ``MAX_BYTES``: a forward per teacher
    per step instead of the memory."""

    runs: list     # the teachers' loaded runs (``rundir.Run``)
    X: Tensor      # N x T, the training examples
    weight: float

    def batch(self, ix: Tensor) -> SoftTargets:
        with torch.no_grad():
            return SoftTargets(mean_prediction(self.runs, self.X[ix]), self.weight)


def mean_prediction(runs: list, X: Tensor) -> Tensor:
    total = None
    for run in runs:
        logits = run.spec.forward(run.params, X, stats=run.stats, keep_cache=False).logits
        p = torch.softmax(logits.float(), dim=-1)
        total = p if total is None else total.add_(p)
    return total.div_(len(runs))


def model_sha256(workdir: Path, missing: str | None = None) -> str:
    path = workdir / rundir.MODEL
    if not path.is_file():
        raise UserError(missing or f"--teacher {workdir} holds no trained model ({rundir.MODEL} is "
                                   "missing); train the teacher first, or pass another directory")
    return hashlib.sha256(path.read_bytes()).hexdigest()


def records(workdirs: list[str]) -> list[dict[str, str]]:
    """config.json's "teachers": each directory, resolved, and its model file's SHA-256."""
    out = []
    for name in workdirs:
        path = Path(name).resolve()
        out.append({"workdir": str(path), "sha256": model_sha256(path)})
    if len({r["workdir"] for r in out}) < len(out):
        raise UserError("--teacher names the same run twice; pass each teacher once")
    return out


def relocate(recorded: list[dict[str, str]], given: list[str]) -> list[dict[str, str]]:
    """The recorded teachers found in the directories given on resume: a teacher that moved is
    the same teacher if its model file has the recorded SHA-256 (as a moved input file is the
    same file if its bytes are). In the recorded order."""
    if len(given) != len(recorded):
        raise UserError(f"--teacher names {len(given)} run(s) but this run was trained with "
                        f"{len(recorded)} teacher(s) ({' '.join(r['workdir'] for r in recorded) or 'none'}); "
                        "pass the same teachers in the same order, or drop --teacher")
    out = []
    for record, name in zip(recorded, given):
        path = Path(name).resolve()
        if model_sha256(path) != record["sha256"]:
            raise UserError(f"--teacher {name} is not the teacher this run was trained with "
                            f"({record['workdir']}): its {rundir.MODEL} differs; pass the same "
                            "teachers in the same order, or drop --teacher to resume it")
        out.append({"workdir": str(path), "sha256": record["sha256"]})
    return out


def load(teachers: list[dict[str, str]], weight: float, data: dict, X: Tensor,
         max_bytes: int | None = None, progress: bool | None = None) -> Teacher | BatchTeacher:
    """The teachers' mean predictions on the training examples ``X`` (N x T, on the run's
    device): a table computed once, or per batch when the table would take more than
    ``max_bytes`` (default ``MAX_BYTES``). ``data`` is the student's config "data" section: a
    teacher must have been trained on the same file with the same split, or its predictions
    would carry the validation and test items into training."""
    from ..models.base import _bar, chunk_rows, chunks

    N, T = X.shape
    runs = []
    for record in teachers:
        path = Path(record["workdir"])
        moved = (f"the teacher {path} is gone ({rundir.MODEL} is missing); if it moved, resume "
                 "with --teacher and the teachers' new directories, in the same order")
        if model_sha256(path, moved) != record["sha256"]:
            raise UserError(f"the teacher {path} has changed since this run started (its "
                            f"{rundir.MODEL} differs); restore it, or train into a new -o WORKDIR")
        run = rundir.load_run(path, X.device)
        seen = run.config["data"]
        if seen.get("sha256") != data["sha256"] or seen["split_seed"] != data["split_seed"]:
            raise UserError(f"the teacher {path} was trained on another file or split; a teacher "
                            "must be trained on the same -i file with the same --split-seed, or "
                            "it would have seen the validation and test items")
        if run.spec.layout != "sequence" or run.spec.block_size(run.cfg) != T:
            raise UserError(f"the teacher {path} is a {run.spec.name} that does not predict every "
                            f"position of a {T}-character block; use a sequence model (rnn, gru, "
                            "bow, transformer) trained on the same file as the teacher")
        runs.append(run)
    V = runs[0].cfg.vocab_size
    if N * T * V * 4 > (max_bytes or MAX_BYTES):
        return BatchTeacher(runs, X, weight)
    total = torch.zeros(N, T, V, dtype=torch.float32, device=X.device)
    with torch.no_grad(), all_threads():
        for run in runs:
            # 4096 rows a chunk, as the published distilled runs were made, unless that takes
            # more than 8 evaluation chunks' memory; then as many as fit one
            rows = chunk_rows(run.spec, run.params, X[:4], run.stats)
            rows = TABLE_CHUNK if TABLE_CHUNK <= 8 * rows else rows
            with _bar(N, f"teacher {run.workdir.name}", progress) as bar:
                for start, stop in chunks(N, rows):
                    logits = run.spec.forward(run.params, X[start:stop], stats=run.stats,
                                              keep_cache=False).logits
                    total[start:stop] += torch.softmax(logits.float(), dim=-1)
                    bar.update(stop - start)
    return Teacher(total.div_(len(teachers)), weight)
