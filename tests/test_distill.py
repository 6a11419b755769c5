"""Distillation (--teacher, --distill): the teachers' predictions, the mixed target's gradient
in a training run, exact resume, and the refusals."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from backprop_ninja.cli import main
from backprop_ninja.data import Dataset, default_data_path
from backprop_ninja.nn.losses import SoftTargets, cross_entropy_forward, IGNORE_INDEX
from backprop_ninja.training import distill
from backprop_ninja.models.base import evaluate
from backprop_ninja.rundir import load_run
from helpers import one_line_error

TINY = ["--type", "transformer", "--n-layer", "1", "--n-head", "2", "--n-embd", "16"]
QUIET = ["--no-progress", "--num-samples", "0", "--eval-every", "0", "--device", "cpu"]


def train(out: Path, *args: str) -> int:
    return main(["train", "-o", str(out), *QUIET, *args])


@pytest.fixture(scope="module")
def teachers(tmp_path_factory) -> tuple[Path, Path]:
    """Two small trained runs on the names: a transformer and a GRU."""
    root = tmp_path_factory.mktemp("teachers")
    assert train(root / "tf", *TINY, "--steps", "60", "--lr", "3e-3") == 0
    assert train(root / "gru", "--type", "gru", "--n-embd2", "16", "--steps", "60",
                 "--lr", "3e-3") == 0
    return root / "tf", root / "gru"


def test_the_targets_are_the_mean_of_the_teachers_predictions(teachers):
    """Each teacher's predictions are checked against its own train loss as ``evaluate`` (the
    eval command's path, not distill's) computes it: -mean log p(y) over every real target;
    the mixture is then the mean of the single teachers' tables."""
    records = distill.records([str(t) for t in teachers])
    data = Dataset.load(default_data_path(), block_size=16, seed=42, layout="sequence")
    X, Y = data.splits["train"]
    config = json.loads((teachers[0] / "config.json").read_text())
    teacher = distill.load(records, 0.25, config["data"], X)
    assert teacher.probs.shape == (X.shape[0], 16, 27) and teacher.weight == 0.25
    singles = [distill.load([r], 0.25, config["data"], X).probs for r in records]
    keep = Y != IGNORE_INDEX
    for path, probs in zip(teachers, singles):
        run = load_run(path)
        nll = -probs.gather(-1, Y.clamp_min(0).unsqueeze(-1)).squeeze(-1)[keep].double().log().mean()
        assert nll.item() == pytest.approx(evaluate(run.spec, run.params, X, Y, run.stats), abs=1e-5)
    torch.testing.assert_close(teacher.probs, (singles[0] + singles[1]) / 2, rtol=0, atol=1e-7)
    torch.testing.assert_close(teacher.probs.sum(-1), torch.ones(X.shape[0], 16))
    rows = torch.arange(0, X.shape[0], 997)
    soft = teacher.batch(rows)
    assert isinstance(soft, SoftTargets) and torch.equal(soft.probs, teacher.probs[rows])


def test_the_loss_mixes_the_label_and_the_teachers():
    """(1 - alpha) times the plain loss plus alpha times the cross-entropy against the teacher;
    alpha 0 is the plain loss, bit for bit."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 6, 27, generator=g, dtype=torch.float64)
    Y = torch.randint(0, 27, (4, 6), generator=g)
    Y[:, 4:] = IGNORE_INDEX
    t = torch.softmax(torch.randn(4, 6, 27, generator=g, dtype=torch.float64), -1)
    plain, _ = cross_entropy_forward(logits, Y, IGNORE_INDEX)
    keep = (Y != IGNORE_INDEX).view(-1)
    against_t = -(t.view(-1, 27)[keep] * torch.log_softmax(logits.view(-1, 27)[keep], -1)).sum(1).mean()
    mixed, _ = cross_entropy_forward(logits, Y, IGNORE_INDEX, SoftTargets(t, 0.3))
    torch.testing.assert_close(mixed, 0.7 * plain + 0.3 * against_t)
    assert torch.equal(cross_entropy_forward(logits, Y, IGNORE_INDEX, SoftTargets(t, 0.0))[0], plain)


def test_a_distilled_run_checks_its_gradients_records_its_teachers_and_resumes_bit_exact(
        teachers, tmp_path, capsys):
    args = [*TINY, "--lr", "3e-3", "--dropout", "0.1", "--sam", "0.05", "--teacher",
            *map(str, teachers)]
    # --check-grads: autograd's gradients of the same mixed loss, with the step's masks, at p
    # and at the point SAM moved to
    assert train(tmp_path / "straight", *args, "--steps", "40", "--check-grads", "40") == 0
    config = json.loads((tmp_path / "straight" / "config.json").read_text())
    assert config["train"]["distill"] == distill.DEFAULT_WEIGHT
    assert [t["workdir"] for t in config["teachers"]] == [str(t.resolve()) for t in teachers]
    assert train(tmp_path / "cut", *args, "--steps", "15") == 0
    assert main(["train", "-o", str(tmp_path / "cut"), "--resume", "--steps", "40", *QUIET]) == 0
    a, c = (load_file(str(tmp_path / d / "checkpoint.safetensors")) for d in ("straight", "cut"))
    assert all(torch.equal(a[k], c[k]) for k in a), "bit-exact resume: a figure of the CPU kernels"
    # the teachers move the student: the same run without them ends elsewhere
    assert train(tmp_path / "alone", *args[:-3], "--steps", "40") == 0
    alone = load_file(str(tmp_path / "alone" / "checkpoint.safetensors"))
    assert not torch.equal(alone["wte"], a["wte"])
    capsys.readouterr()
    rc = main(["train", "-o", str(tmp_path / "cut"), "--resume", "--steps", "60",
               "--teacher", str(teachers[0]), *QUIET])
    one_line_error(capsys, rc, "--teacher names 1 run(s) but this run was trained with 2")
    rc = main(["train", "-o", str(tmp_path / "cut"), "--resume", "--steps", "60",
               "--teacher", *map(str, reversed(teachers)), *QUIET])
    one_line_error(capsys, rc, f"--teacher {teachers[1]} is not the teacher this run was trained with")
    rc = main(["train", "-o", str(tmp_path / "cut"), "--resume", "--steps", "60", "--distill",
               "0.9", *QUIET])
    one_line_error(capsys, rc, "--distill 0.9 differs from the run being resumed (0.5)")


def test_a_moved_teacher_resumes_from_its_new_directory(teachers, tmp_path, capsys):
    """Teachers are recognised by their model file's SHA-256, as the input file by its bytes:
    a moved teacher is named with --teacher on resume, and the run goes on bit-exact."""
    copy = tmp_path / "teacher"
    copy.mkdir()
    for name in ("config.json", "model.safetensors"):
        (copy / name).write_bytes((teachers[1] / name).read_bytes())
    assert train(tmp_path / "straight", *TINY, "--steps", "20", "--teacher", str(copy)) == 0
    assert train(tmp_path / "cut", *TINY, "--steps", "10", "--teacher", str(copy)) == 0
    moved = copy.rename(tmp_path / "moved")
    capsys.readouterr()
    rc = main(["train", "-o", str(tmp_path / "cut"), "--resume", "--steps", "20", *QUIET])
    one_line_error(capsys, rc, f"the teacher {copy} is gone", "resume with --teacher")
    assert main(["train", "-o", str(tmp_path / "cut"), "--resume", "--steps", "20",
                 "--teacher", str(moved), *QUIET]) == 0
    config = json.loads((tmp_path / "cut" / "config.json").read_text())
    assert [t["workdir"] for t in config["teachers"]] == [str(moved.resolve())]
    a, c = (load_file(str(tmp_path / d / "checkpoint.safetensors")) for d in ("straight", "cut"))
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_a_teacher_that_changed_is_refused_on_resume(teachers, tmp_path, capsys):
    copy = tmp_path / "teacher"
    copy.mkdir()
    for name in ("config.json", "model.safetensors"):
        (copy / name).write_bytes((teachers[1] / name).read_bytes())
    assert train(tmp_path / "run", *TINY, "--steps", "10", "--teacher", str(copy)) == 0
    before = (tmp_path / "run" / "checkpoint.safetensors").read_bytes()
    (copy / "model.safetensors").write_bytes((teachers[0] / "model.safetensors").read_bytes())
    capsys.readouterr()
    rc = main(["train", "-o", str(tmp_path / "run"), "--resume", "--steps", "20", *QUIET])
    one_line_error(capsys, rc, "has changed since this run started")
    assert (tmp_path / "run" / "checkpoint.safetensors").read_bytes() == before


def test_teachers_in_the_config_of_a_model_without_them_are_refused(teachers, tmp_path, capsys):
    out = tmp_path / "mlp"
    assert train(out, "--n-hidden", "16", "--steps", "10") == 0
    config = json.loads((out / "config.json").read_text())
    config["teachers"] = distill.records([str(teachers[0])])
    (out / "config.json").write_text(json.dumps(config))
    capsys.readouterr()
    rc = main(["train", "-o", str(out), "--resume", "--steps", "20", *QUIET])
    one_line_error(capsys, rc, "an mlp cannot have teachers")


@pytest.mark.parametrize("argv,needle", [
    (["--steps", "5", "--distill", "0.5"], "--distill needs --teacher"),
    (["--steps", "5", "--distill", "1.5"], "--distill must be between 0 and 1, got 1.5"),
    (["--type", "mlp", "--steps", "5", "--teacher", "TEACHER"],
     "--teacher does not apply to --type mlp (models that learn from a teacher: rnn, gru, bow, "
     "transformer)"),
    ([*TINY, "--steps", "5", "--teacher", "TEACHER", "--distill", "0"], "--distill 0 leaves"),
    ([*TINY, "--steps", "5", "--teacher", "TEACHER", "TEACHER"], "names the same run twice"),
    ([*TINY, "--steps", "5", "--teacher", "NOWHERE"], "holds no trained model"),
    ([*TINY, "--steps", "5", "--teacher", "TEACHER", "--split-seed", "7"],
     "was trained on another file or split"),
    ([*TINY, "--steps", "5", "--block-size", "20", "--teacher", "TEACHER"],
     "does not predict every position of a 20-character block"),
])
def test_bad_distillation_flags(teachers, tmp_path, capsys, argv, needle):
    argv = [str(teachers[0]) if a == "TEACHER" else str(tmp_path / "none") if a == "NOWHERE"
            else a for a in argv]
    rc = train(tmp_path / "run", *argv)
    one_line_error(capsys, rc, needle)
    assert not (tmp_path / "run" / "checkpoint.safetensors").exists()
