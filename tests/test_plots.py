"""The learner's pictures: valid PNG files, showing the right data."""

import json
from pathlib import Path
from types import SimpleNamespace

import matplotlib.image
import pytest
import torch

from backprop_ninja.models import mlp
from backprop_ninja.models.base import calibrate
from backprop_ninja.errors import UserError
from backprop_ninja.plots import dlogits, runs
from backprop_ninja.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_MAGIC
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 200
    assert image.std() > 0.01  # not a blank canvas


def test_plot_dlogits_command(tmp_path, capsys):
    out = tmp_path / "dlogits.png"
    assert main(["plot", "dlogits", "--out", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    assert_png(out)


def test_dlogits_rows_sum_to_zero_and_pull_up_the_target(tmp_path):
    result = dlogits.plot_dlogits(tmp_path / "d.png")
    d, y = result.dlogits, result.targets
    assert d.shape == (32, 27)
    torch.testing.assert_close(d.sum(1), torch.zeros(32), atol=1e-6, rtol=0)
    rows = torch.arange(32)
    assert (d[rows, y] < 0).all()  # the correct class is pulled up
    others = d.clone()
    others[rows, y] = 0
    assert (others >= 0).all()     # every other class is pushed down
    torch.testing.assert_close(d[rows, y], -others.sum(1))


def fake_run(names, metrics):
    cfg = mlp.Config(names.vocab.size, 3, 10, 48)
    params = mlp.init(cfg, torch.Generator().manual_seed(mlp.LECTURE_SEED))
    stats = calibrate(mlp.SPEC, params, names.splits["train"][0][:1000])
    return SimpleNamespace(spec=mlp.SPEC, cfg=cfg, params=params, stats=stats, data=names,
                           metrics=metrics)


def autograd_diagnostics(run, g: torch.Generator) -> dict[str, torch.Tensor]:
    """hpreact, h and the gradients of the loss, written out in plain torch and autograd."""
    Xtr, Ytr = run.data.splits["train"]
    ix = torch.randint(0, Xtr.shape[0], (32,), generator=g)
    X, Y = Xtr[ix], Ytr[ix]
    p = {k: v.detach().clone().requires_grad_() for k, v in run.params.items()}
    hprebn = p["C"][X].view(32, -1) @ p["W1"] + p["b1"]
    mean, var = hprebn.mean(0, keepdim=True), hprebn.var(0, keepdim=True, unbiased=True)
    hpreact = p["bngain"] * (hprebn - mean) / torch.sqrt(var + 1e-5) + p["bnbias"]
    h = torch.tanh(hpreact)
    loss = torch.nn.functional.cross_entropy(h @ p["W2"] + p["b2"], Y)
    dh, dhpreact, *dparams = torch.autograd.grad(loss, [h, hpreact, *p.values()])
    return {"hpreact": hpreact.detach(), "h": h.detach(), "dh": dh, "dhpreact": dhpreact,
            **{"d" + k: v for k, v in zip(p, dparams)}}


def test_diagnostics_of_a_fake_run(tmp_path, names):
    metrics = [{"step": s, "loss": 3.0, "lr": 0.1} for s in range(10)]
    for s in (3, 7):
        metrics[s]["ud"] = {k: -3.0 + 0.1 * s for k in mlp.PARAM_NAMES}
    out = tmp_path / "diag.png"
    run = fake_run(names, metrics)
    d = runs.plot_diagnostics(run, out)
    assert_png(out)
    assert d.activations["h"].shape == d.activations["hpreact"].shape == (32, 48)
    assert d.activation_grads["dh"].shape == (32, 48)
    assert set(d.param_grads) == set(mlp.PARAM_NAMES)
    # the same batch (32 rows drawn with seed 0) through the lecture's forward, by autograd
    ref = autograd_diagnostics(run, torch.Generator().manual_seed(0))
    for k in ("hpreact", "h"):
        torch.testing.assert_close(d.activations[k], ref[k], msg=lambda m: f"{k}: {m}")
    for k in ("dhpreact", "dh"):
        torch.testing.assert_close(d.activation_grads[k], ref[k], msg=lambda m: f"{k}: {m}")
    for k in mlp.PARAM_NAMES:
        torch.testing.assert_close(d.param_grads[k], ref["d" + k], msg=lambda m: f"d{k}: {m}")
    assert d.ud["W1"] == [(3, pytest.approx(-2.7)), (7, pytest.approx(-2.3))]


def test_diagnostics_without_update_records(tmp_path, names):
    out = tmp_path / "diag.png"
    d = runs.plot_diagnostics(fake_run(names, [{"step": 0, "loss": 3.3, "lr": 0.1}]), out)
    assert d.ud == {} and out.exists()
    assert_png(out)


def test_diagnostics_of_a_real_short_run(tmp_path, capsys):
    workdir = tmp_path / "run"
    assert main(["train", "--steps", "300", "--diag-every", "50", "--n-hidden", "64",
                 "--no-progress", "--num-samples", "0", "-o", str(workdir)]) == 0
    capsys.readouterr()
    assert main(["plot", "diagnostics", "-o", str(workdir)]) == 0
    assert f"wrote {workdir / 'diagnostics.png'}" in capsys.readouterr().out
    assert_png(workdir / "diagnostics.png")
    d = runs.diagnose_run(runs.load_run_for_plot(workdir))
    # the panel draws exactly the run's records (whose values tests/test_train.py checks against
    # the parameters' real change), at the steps they were made
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    recorded = [(r["step"], r["ud"]["W1"]) for r in rows if "ud" in r]
    assert [step for step, _ in recorded] == [49, 99, 149, 199, 249, 299]
    assert d.ud["W1"] == recorded


@pytest.mark.parametrize("make", ["missing", "empty"])
def test_bad_workdir_is_a_one_line_error(make, tmp_path, capsys):
    workdir = tmp_path / "run"
    if make == "empty":
        workdir.mkdir()
    assert main(["plot", "diagnostics", "-o", str(workdir)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err and str(workdir) in err


@pytest.fixture(scope="module")
def tiny_transformer(tmp_path_factory):
    out = tmp_path_factory.mktemp("tf") / "run"
    assert main(["train", "--type", "transformer", "--n-layer", "2", "--n-head", "2", "--n-embd", "8",
                 "-o", str(out), "--steps", "50", "--no-progress", "--num-samples", "0",
                 "--eval-every", "0"]) == 0
    return out


def test_plot_attention_command(tiny_transformer, tmp_path, capsys):
    out = tmp_path / "att.png"
    assert main(["plot", "attention", "-o", str(tiny_transformer), "--out", str(out), "--items", "1"]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    assert_png(out)
    assert main(["plot", "attention", "-o", str(tiny_transformer), "--items", "0"]) == 2
    assert "--items must be between 1 and 16" in capsys.readouterr().err


def test_attention_maps_of_a_trained_transformer(tiny_transformer, tmp_path):
    run = runs.load_run_for_plot(tiny_transformer)
    maps = runs.plot_attention(run, tmp_path / "att.png", items=2)
    assert_png(tmp_path / "att.png")
    assert len(maps) == 2 and maps[0].shape == (2, 2, 16, 16)
    for att in maps:  # each row a distribution over the positions up to it, nothing after
        torch.testing.assert_close(att.sum(-1), torch.ones(2, 2, 16))
        assert (att.triu(1) == 0).all()


@pytest.mark.parametrize("name", ["wavenet", "gru", "transformer"])
def test_diagnostics_of_every_type(name, tmp_path):
    out = tmp_path / "run"
    small = {"wavenet": ["--n-hidden", "16"], "gru": ["--n-embd2", "16"],
             "transformer": ["--n-layer", "1", "--n-head", "2", "--n-embd", "8"]}[name]
    assert main(["train", "--type", name, *small, "-o", str(out), "--steps", "30", "--no-progress",
                 "--num-samples", "0", "--eval-every", "0", "--diag-every", "10"]) == 0
    d = runs.plot_diagnostics(runs.load_run_for_plot(out), tmp_path / "d.png")
    assert_png(tmp_path / "d.png")
    assert set(d.param_grads) == set(d.params) and set(d.ud) == set(d.params)
    for k, act in d.activations.items():
        assert d.activation_grads["d" + k].shape == act.shape


def test_attention_of_a_model_without_it_is_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--type", "bigram", "-o", str(out), "--steps", "5", "--no-progress",
                 "--num-samples", "0", "--eval-every", "0"]) == 0
    with pytest.raises(UserError, match="needs a model with attention .transformer.; the run is a bigram"):
        runs.plot_attention(runs.load_run_for_plot(out), tmp_path / "a.png")


# --- what each model has, and panels that say what they show ----------------------------------

def test_cross_entropy_dlogits_matches_autograd_with_padding():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 5, 7, generator=g, dtype=torch.float64)
    Y = torch.randint(0, 7, (4, 5), generator=g)
    Y[1, 3:] = -1  # padding: no loss, no gradient
    leaf = logits.clone().requires_grad_()
    loss = torch.nn.functional.cross_entropy(leaf.view(-1, 7), Y.view(-1), ignore_index=-1)
    (expected,) = torch.autograd.grad(loss, leaf)
    got = runs.cross_entropy_dlogits(logits, Y)
    assert got.shape == logits.shape
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def panels(d):
    from matplotlib.figure import Figure

    axes = Figure().subplots(2, 2)
    runs.activation_panel(axes[0][0], d)
    runs.activation_grad_panel(axes[0][1], d)
    runs.param_grad_panel(axes[1][0], d)
    runs.ud_panel(axes[1][1], d)
    return [a for row in axes for a in row]


def test_a_model_without_hidden_activations_shows_its_logits(names):
    from backprop_ninja.models import bigram

    cfg = bigram.SPEC.make_config(names.vocab.size, {})
    params = bigram.SPEC.init(cfg, torch.Generator().manual_seed(1))
    run = SimpleNamespace(spec=bigram.SPEC, cfg=cfg, params=params, stats={}, data=names, metrics=[])
    d = runs.diagnose_run(run)
    assert d.logits and set(d.activations) == {"logits"} and set(d.activation_grads) == {"dlogits"}
    act, grad, _, ud = panels(d)
    assert act.lines and grad.lines  # not blank
    for ax in (act, grad, ud):
        assert "tanh" not in ax.get_title() and "batchnorm" not in ax.get_title()


def test_the_update_to_data_panel_shows_one_record_and_says_when_there_is_none(names):
    one = [{"step": s, "loss": 3.0, "lr": 0.1} for s in range(1500)]
    one[1000]["ud"] = {k: -2.5 for k in mlp.PARAM_NAMES}
    one[1000]["ud"]["b1"] = -30.0  # the floor: a bias before batchnorm does not move
    d = runs.diagnose_run(fake_run(names, one))
    ud = panels(d)[3]
    drawn = [line for line in ud.lines if line.get_label() in mlp.PARAM_NAMES]
    assert drawn and all(line.get_marker() == "o" for line in drawn)  # a single point shows
    assert "b1" not in [line.get_label() for line in ud.lines]
    assert any("not changed by the steps: b1" in t.get_text() for t in ud.texts)
    d = runs.diagnose_run(fake_run(names, one[:999]))
    ud = panels(d)[3]
    assert ud.get_legend() is None and not ud.lines  # no empty legend, no guide under the note
    assert any("no update-to-data records" in t.get_text() for t in ud.texts)


def test_attention_title_clears_the_panels_and_there_is_a_colour_bar(tiny_transformer, tmp_path,
                                                                      monkeypatch):
    figures = []
    real_save = runs.save
    monkeypatch.setattr(runs, "save", lambda fig, out, force=False: (figures.append(fig),
                                                                      real_save(fig, out, force)))
    runs.plot_attention(runs.load_run_for_plot(tiny_transformer), tmp_path / "a.png", items=1)
    (fig,) = figures
    renderer = fig.canvas.get_renderer()
    panels_ = [ax for ax in fig.axes if ax.get_title()]
    assert len(fig.axes) == len(panels_) + 1  # the colour bar
    title_bottom = fig._suptitle.get_window_extent(renderer).y0
    assert all(ax.title.get_window_extent(renderer).y1 <= title_bottom for ax in panels_)
