"""``backprop-ninja bench --data FILE``: what a file costs each model, end to end.

For each model type at its recipe, in a fresh process (so that its peak memory is its own):
the load (reading, splitting and building the examples, the memory estimate, the
initialisation), ``--steps`` training steps (steps/s), the final evaluation as ``train`` makes
it (batchnorm calibration, the train loss, exact or a sample's estimate, and the val loss), the
test loss, and the process's peak resident memory. Nothing is written but a temporary work
directory, removed after.

``--compare`` adds, per model, the evaluation itself before and after this module's changes, on
the val split at the initialisation: seconds per million targets and the process's peak memory,
"before" being the former evaluation (the training forward, backward caches kept, in fixed
4096-row chunks, every row padded to the block) and "after" ``models.base.evaluate``.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import resource
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from .. import models
from ..models.base import chunks, evaluate
from ..nn.losses import IGNORE_INDEX


def peak_mb() -> float:
    """The process's peak resident memory so far (since ``reset_peak``, where Linux allows)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak() -> bool:
    """Start the peak over from the current resident memory (Linux's clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def run_one(name: str, path: str, steps: int, exact_train: bool) -> dict:
    """One model on one file, as ``train --type NAME -i FILE --steps N`` runs it."""
    from .config import new_config
    from .loop import Options, run_loop
    from .run import save_model, start_run
    from .threads import all_threads

    spec = models.get(name)
    tcfg = new_config(spec.recipe, {"steps": steps})
    workdir = Path(tempfile.mkdtemp(prefix="bn-scale-"))
    try:
        t0 = time.perf_counter()
        state = start_run(workdir / "run", path, spec, {}, tcfg, 42, "cpu")
        load_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        run_loop(state, Options(eval_every=0, checkpoint_every=0, diag_every=0, progress=False,
                                log=lambda s: None))
        steps_s = time.perf_counter() - t1
        t2 = time.perf_counter()
        train, val, _ = save_model(state, exact_train=exact_train, progress=False)
        final_s = time.perf_counter() - t2
        params = state.model if state.model is not None else state.params
        from .. import rundir
        stats = rundir.load_run(state.workdir).stats
        t3 = time.perf_counter()
        with all_threads():
            test = evaluate(spec, params, *state.data.splits["test"], stats)
        test_s = time.perf_counter() - t3
        return {"model": name, "items": len(state.data.items), "symbols": state.data.vocab.size,
                "block": state.data.block_size, "load_s": load_s, "steps": steps,
                "steps_per_s": steps / steps_s, "final_eval_s": final_s, "test_s": test_s,
                "end_to_end_s": time.perf_counter() - t0 - test_s,
                "train": train.loss, "train_exact": train.exact, "train_stderr": train.stderr,
                "train_rows": train.items, "val": val, "test": test, "peak_mb": peak_mb()}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def before_evaluate(spec, params, X, Y, stats) -> float:
    """The evaluation as it was: the training forward (caches kept) in 4096-row chunks."""
    X, Y = X.long(), Y.long()
    counts = (Y != IGNORE_INDEX).reshape(Y.shape[0], -1).sum(1)
    total = torch.zeros((), dtype=torch.float64)
    for start, stop in chunks(X.shape[0], 4096):
        loss = spec.forward(params, X[start:stop], Y[start:stop], stats).loss
        total += loss.double() * counts[start:stop].sum()
    return (total / counts.sum()).item()


def eval_speed(name: str, path: str, mode: str) -> dict:
    """Seconds per million targets of one evaluation of the val split, and the peak memory."""
    from ..data import Dataset
    from ..models.base import calibrate
    from .threads import all_threads

    spec = models.get(name)
    cfg0 = spec.make_config(1, {})
    data = Dataset.load(path, block_size=spec.block_size(cfg0), layout=spec.layout,
                        compact=(mode == "after"))
    cfg = spec.config_for_data({}, data.vocab.size, data.block_size)
    params = spec.init(cfg, torch.Generator().manual_seed(0))
    X, Y = data.splits["val"]
    with all_threads():
        stats = calibrate(spec, params, data.splits["train"][0][:32768])
        X, Y = X.clone(), Y.clone()
        del data
        base_mb = peak_mb() if not reset_peak() else \
            int(Path("/proc/self/statm").read_text().split()[1]) * 4096 / 2**20
        t = time.perf_counter()
        loss = (before_evaluate if mode == "before" else evaluate)(spec, params, X, Y, stats)
        seconds = time.perf_counter() - t
    targets = int((Y != IGNORE_INDEX).sum())
    return {"model": name, "mode": mode, "targets": targets, "loss": loss,
            "s_per_m_targets": seconds / targets * 1e6, "peak_mb": peak_mb(),
            "eval_mb": peak_mb() - base_mb}


def in_child(fn, *args) -> dict:
    with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def scale(path: str, types: list[str], steps: int = 20, exact_train: bool = False,
          compare: bool = False, log=print) -> dict:
    rows, speeds = [], []
    log(f"{path}: each model at its recipe, {steps} steps, in a fresh process; "
        f"{torch.get_num_threads()} thread(s) for evaluation")
    log(f"{'model':12s} {'load s':>7s} {'steps/s':>8s} {'final eval s':>12s} {'test s':>7s} "
        f"{'end to end s':>12s} {'peak MB':>8s}  train (rows) / val / test")
    for name in types:
        r = in_child(run_one, name, str(path), steps, exact_train)
        rows.append(r)
        train = (f"{r['train']:.4f}" if r["train_exact"] else
                 f"~{r['train']:.4f} +- {r['train_stderr']:.4f} ({r['train_rows']:,} rows)")
        log(f"{name:12s} {r['load_s']:7.1f} {r['steps_per_s']:8.1f} {r['final_eval_s']:12.1f} "
            f"{r['test_s']:7.1f} {r['end_to_end_s']:12.1f} {r['peak_mb']:8.0f}  "
            f"{train} / {r['val']:.4f} / {r['test']:.4f}")
    if compare:
        log("evaluation of the val split at the initialisation, before and after: seconds per "
            "million targets, and the peak memory the evaluation adds (MB)")
        for name in types:
            b, a = (in_child(eval_speed, name, str(path), mode) for mode in ("before", "after"))
            speeds += [b, a]
            log(f"{name:12s} before {b['s_per_m_targets']:7.1f} s/M {b['eval_mb']:6.0f} MB   "
                f"after {a['s_per_m_targets']:7.1f} s/M {a['eval_mb']:6.0f} MB   "
                f"(loss {b['loss']:.6f} / {a['loss']:.6f})")
    return {"file": str(path), "runs": rows, "eval_speed": speeds}


def to_json(result: dict) -> str:
    return json.dumps(result, indent=2)
