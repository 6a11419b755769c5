"""Bigger files at small scale: the cache-free forward, the bounded train-loss sample, the
block-size cap, the memory refusal, the per-batch teacher."""

import json
from types import SimpleNamespace

import pytest
import torch

from backprop_ninja import models
from backprop_ninja.cli import main
from backprop_ninja.data import MAX_AUTO_BLOCK, Dataset
from backprop_ninja.errors import UserError
from backprop_ninja.models import memory
from backprop_ninja.models.base import calibrate, estimate, evaluate
from backprop_ninja.nn.losses import IGNORE_INDEX
from backprop_ninja.training.distill import BatchTeacher

from helpers import one_line_error

SMALL = {"bigram": {}, "mlp": {"n_embd": 3, "n_hidden": 8}, "wavenet": {"block_size": 4, "n_embd": 3, "n_hidden": 6},
         "rnn": {"block_size": 7, "n_embd": 3, "n_embd2": 4}, "gru": {"block_size": 7, "n_embd": 3, "n_embd2": 4},
         "bow": {"block_size": 7, "n_embd": 4, "n_embd2": 6},
         "transformer": {"block_size": 7, "n_layer": 2, "n_head": 2, "n_embd": 8}}
V = 6


def problem(name, n=300, seed=0):
    spec = models.get(name)
    cfg = spec.make_config(V, SMALL[name])
    g = torch.Generator().manual_seed(seed)
    params = spec.init(cfg, g)
    T = spec.block_size(cfg)
    if spec.layout == "sequence":  # makemore's layout: items of random lengths, padded
        lengths = torch.randint(0, T, (n,), generator=g)
        X = torch.zeros(n, T, dtype=torch.long)
        Y = torch.full((n, T), IGNORE_INDEX, dtype=torch.long)
        for i, L in enumerate(lengths.tolist()):
            item = torch.randint(1, V, (L,), generator=g)
            X[i, 1:L + 1], Y[i, :L], Y[i, L] = item, item, 0
    else:
        X, Y = torch.randint(0, V, (n, T), generator=g), torch.randint(0, V, (n,), generator=g)
    return spec, params, X, Y


@pytest.mark.parametrize("name", sorted(models.MODELS))
def test_the_cache_free_forward_gives_the_training_forwards_loss_and_logits(name):
    spec, params, X, Y = problem(name, n=40)
    stats = calibrate(spec, params, X)
    for s in ({}, stats):
        kept = spec.forward(params, X, Y, s or None)
        free = spec.forward(params, X, Y, s or None, keep_cache=False)
        assert free.cache is None and kept.cache is not None
        assert torch.equal(free.loss, kept.loss) and torch.equal(free.logits, kept.logits)
    # indices stored in a smaller type give the same figures
    small = spec.forward(params, X.to(torch.uint8), Y.to(torch.int8), stats or None, keep_cache=False)
    assert torch.equal(small.loss, spec.forward(params, X, Y, stats or None).loss)


@pytest.mark.parametrize("name", sorted(models.MODELS))
def test_evaluation_in_sorted_trimmed_chunks_is_the_whole_batchs_loss(name):
    spec, params, X, Y = problem(name)
    stats = calibrate(spec, params, X, chunk=64)
    whole = spec.forward(params, X, Y, stats or None).loss.item()
    assert evaluate(spec, params, X, Y, stats, chunk=50) == pytest.approx(whole, rel=1e-6)
    assert evaluate(spec, params, X, Y, stats) == pytest.approx(whole, rel=1e-6)  # memory-sized


@pytest.mark.parametrize("name", ["mlp", "transformer"])
def test_the_train_loss_estimate_is_a_bounded_seeded_sample(name):
    spec, params, X, Y = problem(name, n=2000)
    stats = calibrate(spec, params, X)
    exact = evaluate(spec, params, X, Y, stats)
    targets = int((Y != IGNORE_INDEX).sum())
    whole = estimate(spec, params, X, Y, stats, targets=targets)  # the budget holds it all
    assert whole.exact and whole.stderr == 0 and whole.items == 2000
    assert whole.loss == pytest.approx(exact, rel=1e-12)
    est = estimate(spec, params, X, Y, stats, targets=targets // 8)
    assert not est.exact and est.of == 2000 and 200 <= est.items <= 300  # about an eighth
    assert est.stderr > 0 and abs(est.loss - exact) < 5 * est.stderr
    assert est == estimate(spec, params, X, Y, stats, targets=targets // 8)  # seeded
    assert est != estimate(spec, params, X, Y, stats, targets=targets // 8, seed=1)


def test_an_item_over_the_automatic_cap_is_refused_in_one_line(tmp_path, capsys):
    path = tmp_path / "long.txt"
    path.write_text("\n".join(["ab"] * 30 + ["x" * 1000, "y" * 300]) + "\n")
    with pytest.raises(UserError, match=r"2 item\(s\) of 32 are longer than 255 characters "
                                        r"\(the longest has 1,000\)"):
        Dataset.load(path, block_size=None, layout="sequence")
    rc = main(["train", "--type", "rnn", "-i", str(path), "-o", str(tmp_path / "run"), "--steps", "1"])
    one_line_error(capsys, rc, "longer than 255", "--block-size 1001")
    assert MAX_AUTO_BLOCK > 16  # names.txt (15 characters) keeps its block size
    ok = Dataset.load(path, block_size=1001, layout="sequence", compact=True)  # asked for: it fits
    assert ok.block_size == 1001


@pytest.mark.parametrize("flags, needle", [
    (["--type", "transformer", "--block-size", "1000000000"], "--block-size 1000000000"),
    (["--type", "mlp", "--n-hidden", "100000000"], "--n-hidden 100000000"),
    (["--type", "rnn", "--batch-size", "100000000"], "--batch-size 100000000"),
])
def test_what_cannot_fit_is_refused_before_allocating(tmp_path, capsys, flags, needle):
    rc = main(["train", *flags, "-o", str(tmp_path / "run"), "--steps", "1", "--no-progress"])
    err = one_line_error(capsys, rc, needle, "GiB", "pass a smaller")
    assert not (tmp_path / "run" / "checkpoint.safetensors").exists(), err


def test_a_large_vocabulary_is_named_and_a_limit_is_honoured():
    spec = models.get("bigram")
    cfg = spec.make_config(20_000, {})
    parts = memory.estimate(spec, cfg, rows=1000, T=1, batch_size=256, optimizer="sgd")
    assert parts["parameters"] == 4 * 20_000 ** 2 and parts["optimiser"] == 2 * parts["parameters"]
    with pytest.raises(UserError, match="a vocabulary of 20,000 symbols needs about"):
        memory.check_fits(parts, memory.culprit(spec, cfg, 256), limit=1 << 30)
    memory.check_fits(parts, memory.culprit(spec, cfg, 256), limit=sum(parts.values()))


def test_eval_refuses_a_config_too_large_for_the_machine(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--type", "bow", "-o", str(run), "--steps", "2", "--eval-every", "0",
                 "--num-samples", "0", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "train loss" in out
    assert main(["eval", "-o", str(run), "--json", "--no-progress"]) == 0
    figures = json.loads(capsys.readouterr().out)
    assert set(figures) == {"train", "val", "test"}  # names: the train loss stays exact
    config = json.loads((run / "config.json").read_text())
    config["model"]["block_size"] = 10 ** 12
    (run / "config.json").write_text(json.dumps(config))
    for command in (["eval", "-o", str(run)], ["sample", "-o", str(run)],
                    ["train", "-o", str(run), "--resume", "--steps", "4"]):
        one_line_error(capsys, main(command), "block_size 1000000000000", "GiB")


def test_eval_json_names_an_estimated_train_loss(tmp_path, capsys, monkeypatch):
    from backprop_ninja.models import base
    run = tmp_path / "run"
    assert main(["train", "--type", "bigram", "-o", str(run), "--steps", "2", "--eval-every", "0",
                 "--num-samples", "0", "--no-progress"]) == 0
    monkeypatch.setattr(base, "TRAIN_SAMPLE_TARGETS", 5000)
    capsys.readouterr()
    assert main(["eval", "-o", str(run), "--json", "--no-progress"]) == 0
    figures = json.loads(capsys.readouterr().out)
    assert set(figures) == {"train_estimate", "val", "test"}
    est = figures["train_estimate"]
    assert set(est) == {"loss", "stderr", "items", "of"} and est["items"] < est["of"] == 182625
    assert main(["eval", "-o", str(run), "--json", "--no-progress", "--exact-train-loss"]) == 0
    exact = json.loads(capsys.readouterr().out)
    assert set(exact) == {"train", "val", "test"} and exact["val"] == figures["val"]
    assert abs(exact["train"] - est["loss"]) < 5 * est["stderr"]
    assert main(["eval", "-o", str(run), "--no-progress"]) == 0
    assert "estimated on a sample of" in capsys.readouterr().out


def test_per_batch_teacher_predictions_are_the_tables_rows():
    spec, params, X, _ = problem("rnn", n=50)
    run = SimpleNamespace(spec=spec, params=params, stats={})
    table = torch.softmax(spec.forward(params, X).logits.float(), -1)
    teacher = BatchTeacher([run, run], X, 0.5)
    ix = torch.tensor([3, 7, 7, 41])
    soft = teacher.batch(ix)
    assert soft.weight == 0.5 and soft.probs.shape == (4, *table.shape[1:])
    torch.testing.assert_close(soft.probs, table[ix])


def test_sequence_chunks_cover_every_row_once_within_the_memory_of_full_chunks():
    from backprop_ninja.models.base import _spans
    spec, _, X, Y = problem("transformer", n=1000)
    T = X.shape[1]
    for chunk in (1, 7, 64, 5000):
        spans = _spans(spec, X, Y, chunk)
        rows = torch.cat([r for r, _ in spans])
        assert sorted(rows.tolist()) == list(range(1000))
        for r, t in spans:
            valid = (Y[r] != IGNORE_INDEX)
            assert not valid[:, t:].any()  # the columns left out hold no target
            assert len(r) * t <= max(chunk * T, 2 * t) or len(r) <= chunk + 1


def test_bench_data_reports_each_model_on_a_file(tmp_path, capsys):
    path = tmp_path / "words.txt"
    path.write_text("\n".join(f"w{i % 17}x{i % 5}" for i in range(300)) + "\n")
    assert main(["bench", "--data", str(path), "--types", "bigram", "--steps", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    (row,) = result["runs"]
    assert row["model"] == "bigram" and row["items"] == 300 and row["steps"] == 2
    for key in ("load_s", "steps_per_s", "final_eval_s", "test_s", "end_to_end_s", "peak_mb"):
        assert row[key] > 0
