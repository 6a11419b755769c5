"""The default run, end to end: the lecture's recipe for 200,000 steps reaches its losses.

About a minute on one core with the fast step; it is the only test of the target losses, so it
runs by default.
"""

import json

from backprop_ninja.cli import main


def test_default_run_reaches_the_lecture_losses(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "-o", str(out), "--no-progress", "--num-samples", "5"]) == 0
    samples = capsys.readouterr().out.strip().splitlines()[-5:]
    assert all(s and set(s) <= set("abcdefghijklmnopqrstuvwxyz") for s in samples), samples
    assert main(["eval", "-o", str(out), "--json"]) == 0
    losses = json.loads(capsys.readouterr().out)
    assert losses["train"] <= 2.08 and losses["val"] <= 2.12, losses  # lecture: 2.0705 / 2.1099
    assert losses["test"] <= 2.13
