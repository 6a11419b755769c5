"""What a new user hit: a plot that overwrote a run's files, eval and sample that did not work
beside a running train, and the advice they gave."""

import json
import os
from pathlib import Path

import pytest

from backprop_ninja import rundir
from backprop_ninja.cli import main
from helpers import one_line_error

PNG = b"\x89PNG\r\n\x1a\n"
SMALL = ["--no-progress", "--num-samples", "0", "--eval-every", "0", "--device", "cpu"]


@pytest.fixture(scope="module")
def words(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "words.txt"
    path.write_text("\n".join(f"w{chr(97 + i % 26)}{chr(97 + i // 26 % 26)}" for i in range(300)))
    return path


@pytest.fixture
def mlp_run(tmp_path, words, capsys):
    out = tmp_path / "run"
    assert main(["train", "-i", str(words), "-o", str(out), "--steps", "30", "--n-hidden", "16",
                 "--ema", "0.9", *SMALL]) == 0
    capsys.readouterr()
    return out


# --- plot --out never replaces a file that is not a picture, and never makes folders ----------

def test_plot_out_refuses_a_file_that_is_not_a_png(tmp_path, capsys):
    learner = tmp_path / "ex1.py"
    learner.write_text("dprobs = None\n")
    one_line_error(capsys, main(["plot", "dlogits", "--out", str(learner)]),
                   str(learner), "not a PNG", "--force")
    assert learner.read_text() == "dprobs = None\n"


def test_plot_diagnostics_out_config_json_leaves_the_run_usable(mlp_run, capsys):
    config = (mlp_run / "config.json").read_bytes()
    one_line_error(capsys, main(["plot", "diagnostics", "-o", str(mlp_run), "--out",
                                 str(mlp_run / "config.json")]), "not a PNG")
    assert (mlp_run / "config.json").read_bytes() == config
    assert main(["eval", "-o", str(mlp_run)]) == 0


def test_plot_out_in_a_missing_folder_creates_nothing(tmp_path, capsys):
    out = tmp_path / "nonexistent" / "x.png"
    one_line_error(capsys, main(["plot", "dlogits", "--out", str(out)]), "does not exist")
    assert not out.parent.exists()


def test_plot_replaces_its_own_png_and_force_replaces_anything(tmp_path, capsys):
    out = tmp_path / "d.png"
    assert main(["plot", "dlogits", "--out", str(out)]) == 0
    assert main(["plot", "dlogits", "--out", str(out)]) == 0  # a PNG: replaced without asking
    other = tmp_path / "notes.txt"
    other.write_text("mine")
    assert main(["plot", "dlogits", "--out", str(other), "--force"]) == 0
    assert other.read_bytes()[:8] == PNG


@pytest.mark.parametrize("flag", ["-o", "--out-dir", "--work-dir", "--workdir"])
def test_every_command_takes_every_spelling_of_the_work_directory(mlp_run, capsys, flag):
    assert main(["plot", "diagnostics", flag, str(mlp_run), "--out",
                 str(mlp_run / f"d{flag}.png")]) == 0
    assert main(["eval", flag, str(mlp_run)]) == 0
    assert main(["sample", flag, str(mlp_run), "-n", "2", "--seed", "1"]) == 0


# --- eval, sample and plot beside a running train ---------------------------------------------

def test_eval_and_sample_beside_a_running_train_read_its_checkpoint(mlp_run, capsys):
    assert main(["eval", "-o", str(mlp_run), "--json"]) == 0
    finished = json.loads(capsys.readouterr().out)
    (mlp_run / "model.safetensors").unlink()  # as before the run's end
    with rundir.locked(mlp_run):  # a train holds the directory
        assert main(["eval", "-o", str(mlp_run), "--json"]) == 0
        cap = capsys.readouterr()
        # the last checkpoint is the run's end: its moving average is the finished model
        assert json.loads(cap.out) == pytest.approx(finished, abs=1e-6)
        assert "checkpoint at step 30" in cap.err and "still running" in cap.err
        assert "moving average" in cap.err and "calibrated now" in cap.err
        assert main(["sample", "-o", str(mlp_run), "-n", "3", "--seed", "1"]) == 0
        assert len(capsys.readouterr().out.splitlines()) == 3
        assert main(["plot", "diagnostics", "-o", str(mlp_run)]) == 0
    assert (mlp_run / "diagnostics.png").read_bytes()[:8] == PNG


def test_a_train_that_has_not_checkpointed_yet_says_to_wait(tmp_path, capsys):
    out = tmp_path / "starting"
    with rundir.locked(out):
        err = one_line_error(capsys, main(["eval", "-o", str(out)]), "wait")
    assert "--resume" not in err


def test_a_killed_run_without_a_model_still_evaluates(mlp_run, capsys):
    (mlp_run / "model.safetensors").unlink()
    assert main(["eval", "-o", str(mlp_run)]) == 0
    assert "has not finished" in capsys.readouterr().err


# --- messages that misled ---------------------------------------------------------------------

def test_resuming_with_another_input_says_it_is_another_file(mlp_run, words, tmp_path, capsys):
    other = tmp_path / "other.txt"
    other.write_text(words.read_text() + "\nwzz\n")
    err = one_line_error(capsys, main(["train", "-o", str(mlp_run), "--resume", "--steps", "40",
                                       "-i", str(other), *SMALL]), "is another file", str(words))
    assert "has changed" not in err


def test_an_input_that_became_a_fifo_is_not_called_missing(mlp_run, capsys):
    config = json.loads((mlp_run / "config.json").read_text())
    fifo = mlp_run.parent / "fifo.txt"
    os.mkfifo(fifo)
    config["data"]["input"] = str(fifo)
    (mlp_run / "config.json").write_text(json.dumps(config))
    err = one_line_error(capsys, main(["eval", "-o", str(mlp_run)]), str(fifo),
                         "not a regular file")
    assert "missing" not in err


def test_a_config_with_a_bad_train_field_names_it(mlp_run, capsys):
    config = json.loads((mlp_run / "config.json").read_text())
    config["train"]["steps"] = "many"
    (mlp_run / "config.json").write_text(json.dumps(config))
    one_line_error(capsys, main(["train", "-o", str(mlp_run), "--resume", *SMALL]),
                   "train.steps", "'many'")


def test_the_header_says_an_mlp_counts_with_separators_and_names_the_teachers(tmp_path, capsys):
    one = tmp_path / "one.txt"
    one.write_text("ab\nab\nab\nab\nab\nab\nab\nab\nab\nab\n")
    assert main(["train", "-i", str(one), "-o", str(tmp_path / "m"), "--steps", "5",
                 "--n-hidden", "8", *SMALL]) == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert header.startswith("training an mlp of ") and "(3 symbols)" in header
    assert "1 thread;" in header or "threads;" in header
    tiny = ["--type", "bow", "--n-embd", "8", "--n-embd2", "8"]
    teacher = tmp_path / "teacher"
    assert main(["train", *tiny, "-o", str(teacher), "--steps", "5", *SMALL]) == 0
    capsys.readouterr()
    assert main(["train", *tiny, "-o", str(tmp_path / "student"), "--steps", "5", "--teacher",
                 str(teacher), *SMALL]) == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert f"distilled from 1 teacher ({teacher.resolve()}), share 0.5" in header
    assert "32,033 items" in header


def test_counts_are_singular_for_one_and_have_thousands_separators():
    from backprop_ninja.cli.train import count

    assert count(1, "item") == "1 item"
    assert count(20001, "symbol") == "20,001 symbols"
