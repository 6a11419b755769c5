"""The zoo's models: sizes, initialisation, forward modes, calibration, and each model's backward
against both oracles (autograd in float64 and float32, central differences in float64)."""

import pytest
import torch
import torch.nn.functional as F

from backprop_ninja import models
from backprop_ninja.checking.gradcheck import finite_difference_grads, relative_error
from backprop_ninja.checking.models import autograd_param_grads, check_model, jitter_constants
from backprop_ninja.errors import UserError
from backprop_ninja.models import mlp, wavenet
from backprop_ninja.models.base import calibrate, evaluate, num_params
from backprop_ninja.nn.normalisation import BatchNormStats

SEQ = {"block_size": 5, "n_embd": 3, "n_embd2": 4}
SMALL = {"bigram": {}, "mlp": {"block_size": 2, "n_embd": 3, "n_hidden": 4},
         "wavenet": {"block_size": 4, "n_embd": 3, "n_hidden": 5},
         "rnn": SEQ, "gru": SEQ, "bow": SEQ,
         "transformer": {"block_size": 5, "n_layer": 2, "n_head": 2, "n_embd": 4}}


def targets(g, n, V, spec, T):
    """Y for the model's layout: one target per example, or a padded sequence per item."""
    if spec.layout != "sequence":
        return torch.randint(0, V, (n,), generator=g)
    Y = torch.randint(0, V, (n, T), generator=g)
    lengths = torch.randint(1, T + 1, (n,), generator=g)
    Y[torch.arange(T).view(1, T) >= lengths.view(n, 1)] = -1  # makemore's padding
    return Y


def problem(name, seed, n=6, V=5, dtype=torch.float64, **overrides):
    spec = models.get(name)
    cfg = spec.make_config(V, {**SMALL[name], **overrides})
    g = torch.Generator().manual_seed(seed)
    params = {k: v.to(dtype) for k, v in jitter_constants(spec.init(cfg, g), g).items()}
    T = spec.block_size(cfg)
    X = torch.randint(0, V, (n, T), generator=g)
    return spec, cfg, params, X, targets(g, n, V, spec, T)


def test_the_registry_and_unknown_types():
    assert set(models.MODELS) == {"bigram", "mlp", "wavenet", "rnn", "gru", "bow", "transformer"}
    with pytest.raises(UserError, match="the types are bigram, mlp, wavenet, rnn, gru, bow, transformer"):
        models.get("gpt")


@pytest.mark.parametrize("name,overrides,count", [
    ("mlp", {"n_hidden": 64}, 4137), ("mlp", {}, 12297), ("wavenet", {}, 76579), ("bigram", {}, 729),
    ("transformer", {"block_size": 16}, 204544)])
def test_parameter_count(name, overrides, count):
    spec = models.get(name)
    assert num_params(spec.init(spec.make_config(27, overrides), torch.Generator())) == count


@pytest.mark.parametrize("name", sorted(models.MODELS))
def test_init_is_seeded_and_reproducible(name):
    spec = models.get(name)
    cfg = spec.make_config(27, {"block_size": 16} if spec.layout == "sequence" else {})
    a, b = (spec.init(cfg, torch.Generator().manual_seed(7)) for _ in range(2))
    c = spec.init(cfg, torch.Generator().manual_seed(8))
    for k in a:
        assert torch.equal(a[k], b[k])
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_mlp_init_is_the_lectures():
    p = mlp.init(mlp.Config(27), torch.Generator().manual_seed(mlp.LECTURE_SEED))
    assert list(p) == list(mlp.PARAM_NAMES)
    assert p["b1"].shape == (200,) and p["b2"].shape == (27,)
    assert p["bngain"].shape == (1, 200) and p["bnbias"].shape == (1, 200)
    for k in ("b1", "b2", "bnbias"):  # small and random, not zero; the gain is not one
        assert 0 < p[k].abs().max() < 1
    assert (p["bngain"] != 1).all()


def test_wavenet_init_is_the_lectures():
    p = wavenet.init(wavenet.Config(27), torch.Generator().manual_seed(0))
    assert [k for k in p] == ["C", "W1", "bngain1", "bnbias1", "W2", "bngain2", "bnbias2",
                              "W3", "bngain3", "bnbias3", "Wout", "bout"]
    assert p["W1"].shape == (48, 128) and p["W2"].shape == (256, 128) and p["bngain1"].shape == (1, 1, 128)
    assert (p["bngain2"] == 1).all() and (p["bnbias2"] == 0).all() and (p["bout"] == 0).all()
    assert p["W2"].std().item() == pytest.approx(256 ** -0.5, rel=0.05)
    assert p["Wout"].std().item() == pytest.approx(0.1 * 128 ** -0.5, rel=0.1)


@pytest.mark.parametrize("name", sorted(models.MODELS))
@pytest.mark.parametrize("seed,n,V", [(0, 4, 5), (1, 9, 3), (2, 16, 11)])
def test_backward_against_both_oracles(name, seed, n, V):
    spec, _, params, X, Y = problem(name, seed, n=n, V=V)
    grads = spec.backward(spec.forward(params, X, Y).cache)
    ref = autograd_param_grads(spec, params, X, Y)
    numeric = finite_difference_grads(lambda **p: spec.forward(p, X, Y).loss, params,
                                      torch.tensor(1.0, dtype=torch.float64))
    # exactly the parameters' names (in backward order: every consumer looks them up by name)
    assert sorted(grads) == sorted(params)
    for k in params:
        assert grads[k].shape == params[k].shape == ref[k].shape, k
        torch.testing.assert_close(grads[k], ref[k], rtol=1e-10, atol=1e-12)
        if k == "b1":  # b1's true gradient is exactly 0 under batchnorm: compare absolutely
            assert grads[k].abs().max() < 1e-9 and numeric[k].abs().max() < 1e-6
        else:
            assert relative_error(grads[k], numeric[k]) <= 1e-6, k


@pytest.mark.parametrize("name", sorted(models.MODELS))
def test_backward_float32_matches_autograd_at_the_recipe_size(name, names):
    spec = models.get(name)
    cfg = spec.make_config(names.vocab.size, {"block_size": 16} if spec.layout == "sequence" else {})
    T = spec.block_size(cfg)
    X = torch.randint(0, 27, (32, T), generator=torch.Generator().manual_seed(3))
    Y = targets(torch.Generator().manual_seed(4), 32, 27, spec, T)
    result = check_model(spec, cfg, X, Y)
    assert result.ok, (result.rows, result.fd_errors)
    assert [r.name for r in result.rows] == list(spec.init(cfg, torch.Generator()))


def wavenet_by_hand(p, X, stats=None):
    """The lecture's WaveNet written out in plain torch, as an independent reference forward."""
    x = p["C"][X]
    k = 1
    while x.shape[1] > 1:
        n, T, C = x.shape
        x = x.view(n, T // 2, 2 * C) @ p[f"W{k}"]
        if stats is None:
            mean, var = x.mean((0, 1), keepdim=True), x.var((0, 1), keepdim=True, unbiased=True)
        else:
            mean, var = stats[f"bn{k}"]
        x = torch.tanh(p[f"bngain{k}"] * (x - mean) / torch.sqrt(var + 1e-5) + p[f"bnbias{k}"])
        k += 1
    return x.squeeze(1) @ p["Wout"] + p["bout"]


def test_wavenet_forward_is_the_lectures_model():
    spec, _, params, X, Y = problem("wavenet", 3, n=10, V=7, block_size=8)
    ours = spec.forward(params, X, Y)
    torch.testing.assert_close(ours.logits, wavenet_by_hand(params, X))
    torch.testing.assert_close(ours.loss, F.cross_entropy(wavenet_by_hand(params, X), Y))
    assert list(ours.norm_inputs) == ["bn1", "bn2", "bn3"]
    assert ours.norm_inputs["bn2"].shape == (10, 2, 5)


@pytest.mark.parametrize("name", ["mlp", "wavenet"])
def test_given_statistics_equal_batch_statistics_when_they_are_the_batchs(name):
    spec, _, params, X, Y = problem(name, 4, n=10)
    train = spec.forward(params, X, Y)
    stats = {}  # the batch's own statistics, layer by layer
    for layer in train.norm_inputs:
        x = spec.forward(params, X, stats=stats).norm_inputs[layer]
        dims = tuple(range(x.ndim - 1))
        stats[layer] = BatchNormStats(x.mean(dims, keepdim=True), x.var(dims, keepdim=True))
    evaluated = spec.forward(params, X, Y, stats)
    torch.testing.assert_close(evaluated.logits, train.logits)


def test_wavenet_calibration_is_layer_by_layer_over_the_whole_set():
    spec, _, params, _, _ = problem("wavenet", 5, V=5, block_size=8)
    X = torch.randint(0, 5, (1001, 8), generator=torch.Generator().manual_seed(0))
    stats = calibrate(spec, params, X, chunk=300)  # chunks (and a 1-row tail) change nothing
    mean1 = (X.shape[0], 4, 5)
    x = params["C"][X].view(1001, 4, 6) @ params["W1"]
    assert x.shape == mean1
    torch.testing.assert_close(stats["bn1"].mean, x.mean((0, 1), keepdim=True))
    torch.testing.assert_close(stats["bn1"].var, x.var((0, 1), keepdim=True, unbiased=True))
    # the second layer's statistics are those of its input with the first layer's calibrated
    by_hand = {"bn1": stats["bn1"], "bn2": stats["bn2"], "bn3": stats["bn3"]}
    torch.testing.assert_close(spec.forward(params, X, stats=stats).logits, wavenet_by_hand(params, X, by_hand))
    x2 = spec.forward(params, X, stats={"bn1": stats["bn1"]}).norm_inputs["bn2"]
    torch.testing.assert_close(stats["bn2"].var, x2.var((0, 1), keepdim=True, unbiased=True))


def test_mlp_calibration_is_the_unbiased_statistics_of_the_whole_set():
    spec, _, params, _, _ = problem("mlp", 5)
    X = torch.randint(0, 5, (1000, 2), generator=torch.Generator().manual_seed(0))
    stats = calibrate(spec, params, X, chunk=300)
    hprebn = params["C"][X].view(1000, -1) @ params["W1"] + params["b1"]
    torch.testing.assert_close(stats["bn"].mean, hprebn.mean(0, keepdim=True))
    torch.testing.assert_close(stats["bn"].var, hprebn.var(0, keepdim=True, unbiased=True))
    assert calibrate(models.get("bigram"), {"W": torch.zeros(5, 5)}, X[:, :1]) == {}


@pytest.mark.parametrize("name", sorted(models.MODELS))
def test_evaluate_matches_one_big_batch(name):
    spec, _, params, _, _ = problem(name, 6)
    g = torch.Generator().manual_seed(1)
    T = spec.block_size(spec.make_config(5, SMALL[name]))
    X, Y = torch.randint(0, 5, (500, T), generator=g), targets(g, 500, 5, spec, T)
    stats = calibrate(spec, params, X)
    whole = spec.forward(params, X, Y, stats).loss.item()
    assert evaluate(spec, params, X, Y, stats, chunk=77) == pytest.approx(whole, rel=1e-12)


def test_backward_needs_a_training_forward():
    spec, _, params, X, Y = problem("mlp", 7)
    stats = {"bn": BatchNormStats(torch.zeros(1, 4, dtype=torch.float64),
                                  torch.ones(1, 4, dtype=torch.float64))}
    with pytest.raises(ValueError, match="training forward"):
        spec.backward(spec.forward(params, X, Y, stats).cache)


@pytest.mark.parametrize("block", [1, 3, 6, 10, 128])
def test_wavenet_block_sizes_it_cannot_halve(block):
    with pytest.raises(UserError, match="valid sizes are 2, 4, 8, 16, 32, 64"):
        models.get("wavenet").make_config(27, {"block_size": block})


@pytest.mark.parametrize("block", [2, 4, 16])
def test_wavenet_any_number_of_levels(block):
    spec, _, params, X, Y = problem("wavenet", 8, n=5, block_size=block)
    assert len(spec.forward(params, X).norm_inputs) == block.bit_length() - 1
    grads = spec.backward(spec.forward(params, X, Y).cache)
    ref = autograd_param_grads(spec, params, X, Y)
    for k in params:
        torch.testing.assert_close(grads[k], ref[k], rtol=1e-10, atol=1e-12)
