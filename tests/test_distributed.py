"""Data-parallel training with 2 gloo processes on 127.0.0.1: the single-process trajectory for
every model, bit-exact resume, a killed rank and Ctrl-C ending the group, one-line errors.

Each test starts real processes (spawn), so each takes seconds: most of it importing torch and
loading the names twice.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from backprop_ninja.checking.models import TINY
from backprop_ninja import models
from backprop_ninja.cli import main
from helpers import one_line_error

QUIET = ["--no-progress", "--num-samples", "0", "--diag-every", "0"]
# float32 sum-order noise: the ranks' partial sums and the all-reduce add in another order than
# one process does, ~1e-7 relative per operation; over 300 steps the parameters measured stay
# within 6e-7 of their tensor's largest entry (every model). 1e-5 leaves a margin of ~20x and
# is still far below what a wrong sync gives (batchnorm over the local slice, or the padded
# models' ranks averaged unweighted, move the parameters by ~1e-2 over as many steps).
TOL = 1e-5


def tiny_flags(spec) -> list[str]:
    flags = []
    for k, v in TINY[spec.name].items():
        if k != "block_size":  # a sequence model's comes from the data
            flags += ["--" + k.replace("_", "-"), str(v)]
    return flags + (["--dropout", "0"] if spec.dropout else [])


def key_biases(name: str, like: dict) -> dict[str, torch.Tensor]:
    """Where the true gradient is exactly zero, so float noise is all AdamW sees (and it turns
    1e-9 into lr-sized steps): the transformer's key bias h*.b_qkv[1] (softmax is unchanged by
    adding q.b_k to every key of a row). A mask per parameter: True where compared."""
    masks = {k: torch.ones_like(v, dtype=torch.bool) for k, v in like.items()}
    for k in masks:
        if name == "transformer" and k.endswith("b_qkv"):
            masks[k].view(3, -1)[1] = False
    return masks


def rel_diff(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    return ((a - b).abs()[mask].max() / a[mask].abs().max().clamp_min(1e-12)).item()


@pytest.mark.parametrize("name, extra", [(name, []) for name in models.MODELS]
                         + [("mlp", ["--sam", "0.05", "--gloo-loop", "idle"]),
                            ("transformer", ["--dropout", "0.2"])])
def test_two_processes_follow_the_single_process_trajectory(tmp_path, name, extra):
    """Every model, SAM (its first pass summed before its norm is taken; with gloo's loop idle),
    and dropout (each rank its rows of the global batch's masks); an evaluation halfway,
    sharded, with the ranks' parameters and optimiser state compared bit for bit."""
    spec = models.get(name)
    common = ["--type", name, "--steps", "300", "--batch-size", "32", "--eval-every", "150",
              "--checkpoint-every", "0", *tiny_flags(spec), *extra, *QUIET]
    assert main(["train", "-o", str(tmp_path / "one"), *common]) == 0
    assert main(["train", "-o", str(tmp_path / "two"), "--nproc", "2", *common]) == 0
    a, b = (load_file(str(tmp_path / d / "checkpoint.safetensors")) for d in ("one", "two"))
    assert torch.equal(a["rng_state"], b["rng_state"])  # the same batches were drawn
    # the parameters, and the saved model (with --ema, the average)
    ma, mb = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("one", "two"))
    masks = key_biases(name, {k: v for k, v in ma.items() if k in a})
    for k, mask in masks.items():
        assert rel_diff(a[k], b[k], mask) <= TOL, (k, rel_diff(a[k], b[k], mask))
        assert rel_diff(ma[k], mb[k], mask) <= TOL, (k, rel_diff(ma[k], mb[k], mask))
    if all(m.all() for m in masks.values()):  # the flat optimiser state, where nothing is masked
        for k in ("adamw_m", "adamw_v", "ema_params"):
            if k in a:
                assert rel_diff(a[k], b[k], torch.ones_like(a[k], dtype=torch.bool)) <= TOL, k


def test_resume_with_two_processes_is_bit_exact_and_another_count_says_so(tmp_path, capfd):
    common = ["--n-hidden", "32", "--eval-every", "50", *QUIET]
    assert main(["train", "-o", str(tmp_path / "straight"), "--nproc", "2", "--steps", "200", *common]) == 0
    assert main(["train", "-o", str(tmp_path / "cut"), "--nproc", "2", "--steps", "100", *common]) == 0
    assert main(["train", "-o", str(tmp_path / "cut"), "--nproc", "2", "--resume", "--steps", "200",
                 *QUIET]) == 0
    a, b = (load_file(str(tmp_path / d / "checkpoint.safetensors")) for d in ("straight", "cut"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    capfd.readouterr()
    assert main(["train", "-o", str(tmp_path / "cut"), "--resume", "--steps", "250", *QUIET]) == 0
    assert "resuming a run of 2 processes with 1: the same global batch of 32" in capfd.readouterr().out


def zero_flags(name: str) -> list[str]:
    spec = models.get(name)
    return ["--type", name, "--batch-size", "32", "--checkpoint-every", "0", *tiny_flags(spec),
            *QUIET]


def test_zero_takes_the_replicated_groups_updates(tmp_path):
    """ZeRO-1 with 2 ranks: the RNN (AdamW, weight decay) bit for bit, since a sum of two is
    the same either way and each entry's update is AdamW's own; the transformer's recipe (SAM,
    whose norm ZeRO sums from shards, and the EMA) within the 2-process tolerance."""
    for name, steps in (("rnn", "100"), ("transformer", "100")):
        common = [*zero_flags(name), "--steps", steps, "--eval-every", "50", "--nproc", "2"]
        assert main(["train", "-o", str(tmp_path / name), *common]) == 0
        assert main(["train", "-o", str(tmp_path / f"{name}-zero"), "--zero", *common]) == 0
        a, b = (load_file(str(tmp_path / d / "checkpoint.safetensors")) for d in (name, f"{name}-zero"))
        assert a.keys() == b.keys()
        if name == "rnn":
            assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
            continue
        masks = key_biases(name, a)
        for k in a:
            if a[k].is_floating_point() and k != "rng_state":
                mask = masks.get(k, torch.ones_like(a[k], dtype=torch.bool))
                assert rel_diff(a[k], b[k], mask) <= TOL, (k, rel_diff(a[k], b[k], mask))


@pytest.mark.parametrize("name", ["rnn", "transformer"])
def test_zero_resumes_bit_exact_and_its_checkpoint_resumes_without_it(tmp_path, name):
    """A --zero run cut and resumed with --zero equals the straight one bit for bit (the
    transformer: its EMA and SAM states too); the RNN's --zero checkpoint resumed without
    --zero equals a straight run without it (bit for bit: 2 ranks, no SAM)."""
    common = [*zero_flags(name), "--eval-every", "20", "--nproc", "2"]
    runs = [("straight-zero", "cut", ["--zero"])]
    if name == "rnn":
        runs.append(("straight", "cut-plain", []))
    for straight, cut, resumed_with in runs:
        assert main(["train", "-o", str(tmp_path / straight), "--steps", "60", *common,
                     *resumed_with]) == 0
        assert main(["train", "-o", str(tmp_path / cut), "--steps", "30", "--zero", *common]) == 0
        assert main(["train", "-o", str(tmp_path / cut), "--resume", "--steps", "60", "--nproc",
                     "2", *resumed_with, *QUIET]) == 0
        a, b = (load_file(str(tmp_path / d / "checkpoint.safetensors")) for d in (straight, cut))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), (straight, cut)


@pytest.mark.parametrize("args, needle", [
    (["--zero"], "--zero shards AdamW's moments across processes: train with --nproc 2"),
    (["--zero", "--nproc", "2"], "this run's optimiser is sgd, which keeps none"),
    (["--grad", "autograd", "--nproc", "2"], "--grad autograd is a one-process reference"),
])
def test_group_flags_that_cannot_apply_are_one_line_errors(tmp_path, capsys, args, needle):
    rc = main(["train", "-o", str(tmp_path / "run"), "--type", "mlp", "--steps", "10", *QUIET, *args])
    one_line_error(capsys, rc, needle)
    assert not (tmp_path / "run" / "checkpoint.safetensors").exists()


def start(workdir: Path, *args: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "backprop_ninja", "train", "-o", str(workdir), "--nproc", "2",
           "--n-hidden", "32", "--steps", "1000000", "--checkpoint-every", "200", "--eval-every", "0",
           *QUIET, *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_checkpoint(proc: subprocess.Popen, workdir: Path) -> None:
    deadline = time.monotonic() + 120
    while not (workdir / "checkpoint.safetensors").exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.2)


def rank_pid(parent: int, rank: int) -> int:
    """The launcher's child whose environment says RANK=rank."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            env = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == parent and f"RANK={rank}".encode() in env:
            return int(entry.name)
    raise AssertionError(f"no rank {rank} under {parent}")


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the ranks in /proc")
def test_a_killed_rank_ends_the_group_in_bounded_time_and_the_run_resumes(tmp_path):
    workdir = tmp_path / "run"
    proc = start(workdir, "--timeout", "10")
    try:
        wait_for_checkpoint(proc, workdir)
        os.kill(rank_pid(proc.pid, 1), signal.SIGKILL)
        t0 = time.monotonic()
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert time.monotonic() - t0 < 30  # --timeout 10 plus the launcher's grace
    assert proc.returncode == 2
    line = err.strip().splitlines()[-1]
    assert line.startswith("backprop-ninja: error: rank 1 of 2 was killed by SIGKILL"), err
    step = int(load_file_meta(workdir))
    assert main(["train", "-o", str(workdir), "--nproc", "2", "--resume", "--steps", str(step + 10),
                 *QUIET]) == 0


def load_file_meta(workdir: Path) -> str:
    from safetensors import safe_open

    with safe_open(str(workdir / "checkpoint.safetensors"), framework="pt") as f:
        return f.metadata()["step"]


def test_ctrl_c_stops_every_rank_at_one_step_with_one_checkpoint(tmp_path):
    workdir = tmp_path / "run"
    proc = start(workdir)
    try:
        wait_for_checkpoint(proc, workdir)
        proc.send_signal(signal.SIGINT)  # the launcher forwards it to every rank
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "interrupted at step" in out and "Traceback" not in err
    step = int(load_file_meta(workdir))
    assert f"interrupted at step {step} " in out  # the checkpoint is of the step every rank stopped at
    assert main(["train", "-o", str(workdir), "--nproc", "2", "--resume", "--steps", str(step + 10),
                 *QUIET]) == 0


@pytest.mark.parametrize("args, needle", [
    (["--nproc", "0"], "--nproc must be at least 1"),
    (["--nproc", "-2"], "--nproc must be at least 1"),
    (["--nproc", "64"], "--nproc 64 is larger than the batch (32)"),
    (["--nproc", "3"], "3 processes do not divide it"),
    (["--nproc", "2", "--backend", "nccl", "--device", "cpu"], "nccl"),
])
def test_bad_nproc_is_a_one_line_error(tmp_path, capsys, args, needle):
    if "nccl" in args and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    rc = main(["train", "-o", str(tmp_path / "run"), "--steps", "10", *QUIET, *args])
    one_line_error(capsys, rc, needle)
    assert not (tmp_path / "run" / "checkpoint.safetensors").exists()


def test_a_port_in_use_is_a_one_line_error(tmp_path, capsys):
    import datetime

    import torch.distributed as dist

    busy = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                         timeout=datetime.timedelta(seconds=5))
    rc = main(["train", "-o", str(tmp_path / "run"), "--nproc", "2", "--master-port", str(busy.port),
               "--steps", "10", *QUIET])
    one_line_error(capsys, rc, f"port {busy.port} on 127.0.0.1 is in use")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs two GPUs")
def test_two_gpus_follow_the_single_gpu_trajectory(tmp_path):
    common = ["--n-hidden", "32", "--steps", "300", "--eval-every", "0", "--device", "cuda", *QUIET]
    assert main(["train", "-o", str(tmp_path / "one"), *common]) == 0
    assert main(["train", "-o", str(tmp_path / "two"), "--nproc", "2", *common]) == 0
    a, b = (load_file(str(tmp_path / d / "checkpoint.safetensors")) for d in ("one", "two"))
    for k in ("C", "W1", "W2", "bngain"):
        assert rel_diff(a[k], b[k], torch.ones_like(a[k], dtype=torch.bool)) <= TOL


def rank_with_its_own_data(args: dict) -> int:
    """A rank whose input differs on rank 1 (as a machine with another copy of the file)."""
    from backprop_ninja.training import distributed

    group = distributed.join(args["timeout"], "cpu", None)
    try:
        group.check_same({"data": {"sha256": "a" if group.rank == 0 else "b"}})
    finally:
        group.close()
    return 0


def test_ranks_whose_data_differ_stop_with_one_line(capsys):
    from backprop_ninja.errors import UserError
    from backprop_ninja.training import distributed

    with pytest.raises(UserError, match=r"rank\(s\) 1 start from other code, data or config than rank 0"):
        distributed.launch({"timeout": 20.0}, rank_with_its_own_data, 2, None, 20.0)


def test_a_rank_killed_by_a_signal_is_named_even_when_all_end_together(monkeypatch):
    """The launcher names the rank a signal killed, not another rank's report of the broken
    group, also when both ended between two of its looks (the polling loop never saw the
    killed rank running-then-dead)."""
    from types import SimpleNamespace

    from backprop_ninja.errors import UserError
    from backprop_ninja.training import distributed

    class Receive:
        def __init__(self, message):
            self.message = message

        def poll(self):
            return self.message is not None

        def recv(self):
            return self.message

    procs = [SimpleNamespace(exitcode=2, pid=None, join=lambda t: None, kill=lambda: None),
             SimpleNamespace(exitcode=-9, pid=None, join=lambda t: None, kill=lambda: None)]
    errors = [Receive((0, True, "rank 0: the group broke off")), Receive(None)]
    with pytest.raises(UserError, match="rank 1 of 2 was killed by SIGKILL"):
        distributed.wait(procs, 10.0, None, errors)


GLOO_LOOP_CHILD = """
import os, sys
import torch.distributed as dist
from backprop_ninja.training.distributed import GLOO_LOOP, yield_gloo_loop
dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
changed = yield_gloo_loop()
idle = [t for t in os.listdir("/proc/self/task")
        if open(f"/proc/self/task/{t}/comm").read().strip() == GLOO_LOOP
        and os.sched_getscheduler(int(t)) == os.SCHED_IDLE]
print(changed, len(idle))
dist.destroy_process_group()
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux's per-thread scheduler")
def test_the_gloo_event_loop_thread_yields_to_every_other_thread(tmp_path):
    """The collectives' latency fix (``yield_gloo_loop``): gloo's loop thread is found by its
    name and put under SCHED_IDLE. If a torch release renamed the thread, this says so."""
    store = tmp_path / "store"  # a one-process group meets on a file
    out = subprocess.run([sys.executable, "-c", GLOO_LOOP_CHILD, str(store)], capture_output=True,
                         text=True, timeout=120, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert out.returncode == 0, out.stderr[-2000:]
    changed, idle = map(int, out.stdout.split())
    assert changed >= 1 and idle == changed


def test_the_scaling_command_times_every_configuration(monkeypatch):
    """The rows' mechanics (figures depend on the machine): for a model trained with AdamW,
    1 x 1, 1 x 2, 2 x 1, 2 x 1 with gloo's loop idle and 2 x 1 with ZeRO-1, each timed in its
    own processes."""
    from backprop_ninja.training import scaling

    monkeypatch.setattr(scaling, "sizes", lambda spec: [(8, {})])
    rows = scaling.scaling("rnn", 2, log=lambda line: None)
    assert [(r["processes"], r["threads"], r["zero"], r["gloo_loop"]) for r in rows] == \
        [(1, 1, False, "normal"), (1, 2, False, "normal"), (2, 1, False, "normal"),
         (2, 1, False, "idle"), (2, 1, True, "normal")]
    assert all(r["steps_per_s"] > 0 and r["examples_per_s"] == r["steps_per_s"] * 8 for r in rows)
    assert rows[0]["vs_1x1"] == 1.0 and rows[0]["allreduce_share"] == 0.0
    assert all(0 < r["allreduce_share"] < 1 and r["efficiency"] is not None for r in rows[2:])
