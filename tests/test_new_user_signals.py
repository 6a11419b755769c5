"""Ctrl-C and SIGTERM (what job schedulers send) stop a run at a step boundary and save it, and
say so the moment they arrive."""

import os
import signal
import subprocess
import sys
import time

import pytest

from backprop_ninja import rundir


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_at_a_step_and_saves_saying_so_at_once(tmp_path, signum):
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "backprop_ninja", "train", "-o", str(out), "--steps", "100000000",
         "--n-hidden", "16", "--no-progress", "--num-samples", "0", "--eval-every", "0",
         "--checkpoint-every", "50", "--device", "cpu", "--num-threads", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        assert proc.stdout.readline().startswith("training a")
        deadline = time.monotonic() + 120
        while not (out / rundir.CHECKPOINT).exists():  # the first checkpoint: the loop runs
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        proc.send_signal(signum)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr
    assert "stopping at the next step boundary" in stderr
    assert "again to stop at once" in stderr
    assert "Traceback" not in stderr
    step = int(rundir.checkpoint_meta(out)["step"])
    assert step > 0 and (out / "model.safetensors").exists()
    assert f"interrupted at step {step}" in stdout
