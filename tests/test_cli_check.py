import json

from backprop_ninja.cli import main
from helpers import lecture_loss_with_plain_torch


def test_check_json(capsys):
    assert main(["check", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) >= {"exercise1", "exercise2", "exercise3", "model", "loss_at_init"}
    assert len(out["exercise1"]) == 26 and out["ok"] is True
    assert [r["name"] for r in out["exercise2"]] == ["logits"]
    assert [r["name"] for r in out["exercise3"]] == ["hprebn"]
    assert len(out["model"]) == 7
    for row in out["exercise1"] + out["model"]:
        assert set(row) >= {"name", "exact", "approx", "maxdiff"} and row["approx"]


def test_check_table(capsys):
    assert main(["check"]) == 0
    out = capsys.readouterr().out
    # the figure from the lecture's setup written out with plain torch (tests/helpers.py)
    assert f"loss at initialisation: {lecture_loss_with_plain_torch():.4f}" in out
    assert "bit-exact" in out and "all gradients match autograd" in out


def test_check_batch_of_one_is_a_one_line_error(capsys):
    assert main(["check", "--batch-size", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "at least 2" in err and "Traceback" not in err
