"""The work directory keeps what it holds: one train run at a time, nothing rewritten by a resume
that adds nothing, the input file it was trained on and no other, and bugs reported as bugs."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from backprop_ninja.training import fused_mlp
from backprop_ninja import rundir
from backprop_ninja.cli import main
from helpers import one_line_error

SMALL = ["--n-hidden", "32", "--no-progress", "--num-samples", "0", "--eval-every", "0"]
FILES = ("config.json", "metrics.jsonl", "checkpoint.safetensors")


@pytest.fixture
def run(tmp_path, capsys):
    words = tmp_path / "words.txt"
    words.write_text("\n".join(f"w{chr(97 + i % 26)}{chr(97 + i // 26 % 26)}" for i in range(200)))
    out = tmp_path / "run"
    assert main(["train", "-i", str(words), "-o", str(out), "--steps", "40", *SMALL, "--device", "cpu"]) == 0
    capsys.readouterr()
    return words, out


def snapshot(out: Path) -> dict[str, bytes]:
    return {name: (out / name).read_bytes() for name in FILES}


def resume(out: Path, *args: str) -> int:
    return main(["train", "-o", str(out), "--resume", *SMALL, *args])


# --- one train run per directory --------------------------------------------------------------

def test_a_second_train_is_refused_while_eval_and_sample_work(run, capsys):
    _, out = run
    before = snapshot(out)
    with rundir.locked(out):
        one_line_error(capsys, resume(out, "--steps", "80"), "in use by a running train",
                       f"pid {os.getpid()}")
        one_line_error(capsys, main(["train", "-o", str(out), "--steps", "80", *SMALL]),
                       "in use by a running train")
        assert main(["eval", "-o", str(out)]) == 0
        assert main(["sample", "-o", str(out), "-n", "3", "--seed", "1"]) == 0
    assert snapshot(out) == before
    assert resume(out, "--steps", "80") == 0  # the lock went with its holder


def test_two_concurrent_runs_one_refused_and_a_killed_run_leaves_no_lock(tmp_path, capsys):
    out = tmp_path / "same"
    cmd = [sys.executable, "-m", "backprop_ninja", "train", "-o", str(out), "--steps", "10000000",
           *SMALL]
    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while f"pid {first.pid}" not in read_lock(out):
            assert first.poll() is None and time.monotonic() < deadline, "the first run never started"
            time.sleep(0.1)
        one_line_error(capsys, main(["train", "-o", str(out), "--steps", "30", *SMALL]),
                       f"pid {first.pid}")
    finally:
        first.kill()
        first.wait()
    assert not (out / "metrics.jsonl").exists()  # SIGKILL before its first checkpoint
    assert main(["train", "-o", str(out), "--steps", "30", *SMALL]) == 0


def read_lock(out: Path) -> str:
    try:
        return (out / rundir.LOCK).read_text()
    except FileNotFoundError:
        return ""


# --- a resume that adds nothing changes nothing -----------------------------------------------

def test_resume_that_fails_before_adding_a_step_changes_no_file(run, capsys, monkeypatch):
    _, out = run
    before = snapshot(out)
    one_line_error(capsys, resume(out, "--steps", "80", "--lr", "0.5"), "--lr 0.5 differs")
    assert resume(out, "--steps", "40") == 0  # nothing to add: the run is already there
    assert snapshot(out) == before
    # a first resumed step that diverges: the files stay those of the last good checkpoint
    nan_step = fused_mlp.FastStep.step
    monkeypatch.setattr(fused_mlp.FastStep, "step", lambda self, ix, lr: nan_step(self, ix, lr) * float("nan"))
    one_line_error(capsys, resume(out, "--steps", "80"), "the loss became nan at step 40",
                   "checkpoint at step 40 is kept")
    assert snapshot(out) == before
    monkeypatch.undo()
    assert resume(out, "--steps", "80") == 0
    after = snapshot(out)
    assert after["checkpoint.safetensors"] != before["checkpoint.safetensors"]
    assert len(after["metrics.jsonl"].splitlines()) == 80
    assert b'"steps": 80' in after["config.json"]


# --- the input file ---------------------------------------------------------------------------

def test_an_edited_input_with_the_same_alphabet_is_refused(run, capsys):
    words, out = run
    before = snapshot(out)
    lines = words.read_text().splitlines()
    words.write_text("\n".join(lines[1:] + lines[:1]))  # same items and alphabet, another order
    err = one_line_error(capsys, resume(out, "--steps", "80"), "has changed", "-i FILE")
    assert "SHA-256" in err
    err = one_line_error(capsys, main(["eval", "-o", str(out)]), "has changed", "restore the original")
    assert "-i" not in err  # eval takes no -i: it must not advise one
    one_line_error(capsys, main(["sample", "-o", str(out), "-n", "2"]), "has changed")
    assert snapshot(out) == before


def test_a_moved_input_resumes_with_i_and_eval_says_put_it_back(run, capsys):
    words, out = run
    moved = words.with_name("moved.txt")
    words.rename(moved)
    one_line_error(capsys, resume(out, "--steps", "60"), "is missing", "pass its new location with -i FILE")
    err = one_line_error(capsys, main(["eval", "-o", str(out)]), "is missing", "put it back")
    assert "-i" not in err
    assert resume(out, "--steps", "60", "-i", str(moved)) == 0
    assert main(["eval", "-o", str(out)]) == 0  # the config now records where the file is
    other = moved.with_name("other.txt")
    other.write_text(moved.read_text() + "\nwzz\n")
    one_line_error(capsys, resume(out, "--steps", "70", "-i", str(other)), "is another file",
                   str(moved))


def test_split_seed_zero_is_kept(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "-o", str(out), "--steps", "20", "--split-seed", "0", *SMALL]) == 0
    assert '"split_seed": 0' in (out / "config.json").read_text()
    assert resume(out, "--steps", "30", "--split-seed", "0") == 0
    capsys.readouterr()
    one_line_error(capsys, resume(out, "--steps", "40", "--split-seed", "42"), "--split-seed 42 differs")


# --- bad files are bad files, bugs are bugs ---------------------------------------------------

@pytest.mark.parametrize("edit, needle", [
    (lambda c: c["model"].update(vocab_size="27"), "model section"),
    (lambda c: c["data"].update(vocab="abc"), "data.vocab"),
    (lambda c: c.pop("train"), "no 'train' section"),
    (lambda c: c.update(format="other"), "format 'other'"),
    (None, "not JSON"),
])
def test_a_bad_config_is_one_line(run, capsys, edit, needle):
    _, out = run
    config = json.loads((out / "config.json").read_text())
    if edit is not None:
        edit(config)
    (out / "config.json").write_text(json.dumps(config) if edit else "{not json")
    one_line_error(capsys, main(["eval", "-o", str(out)]), "not a backprop-ninja config", needle)


def test_a_bug_while_reading_a_checkpoint_is_not_called_corruption(run, monkeypatch):
    _, out = run

    def buggy(*args, **kwargs):
        raise TypeError("a bug in the code")

    monkeypatch.setattr(rundir, "safe_open", buggy)
    with pytest.raises(TypeError, match="a bug in the code"):
        rundir.checkpoint_meta(out)


def test_training_leaves_the_matplotlib_backend_alone(tmp_path):
    code = ("import matplotlib; matplotlib.use('svg'); from backprop_ninja.cli import main; "
            f"main(['train', '-o', {str(tmp_path / 'r')!r}, '--steps', '20', "
            "'--n-hidden', '8', '--no-progress', '--num-samples', '0']); "
            "print(matplotlib.get_backend())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "svg"
    assert (tmp_path / "r" / "loss.png").read_bytes()[:4] == b"\x89PNG"
