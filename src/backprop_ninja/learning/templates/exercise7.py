"""Exercise 7: the WaveNet's batchnorm backward, over a 3-D input.

In the WaveNet every layer's batchnorm sees an n x T x C input: T groups of positions per
sequence. forward() below takes its statistics over dims (0, 1), all n*T rows of each feature
(makemore part 5's fix: over dim 0 alone it would keep T separate means per feature), with the
variance divided by n*T - 1 (Bessel's correction over those n*T values). Derive the gradients on
paper (exercise 3's formula, with the right count) and fill in the blanks in backward(): dgain
and dbias from dout, then dx in one formula.

Contract (what the checker calls and expects):
    backward(x, gain, xhat, var_inv, dout) is called with keyword arguments: the n x T x C input
    x, the 1 x 1 x C gain, the n x T x C xhat and the 1 x 1 x C var_inv of forward(), and the
    n x T x C upstream gradient dout (plain tensors: no autograd, and you must not use it). It
    returns a dict {"gain": dgain, "bias": dbias, "x": dx}, each gradient of its tensor's shape.

Check it:
    backprop-ninja exercise 7 --check THIS_FILE      (or run this file with python)

Dimension letters: n batch, T positions, C features; m = n*T, the values per feature.
"""

try:
    import torch
except ImportError:  # a Python without torch (the system's): say how to run this file
    if __name__ != "__main__":
        raise
    raise SystemExit("this Python has no torch: run the file with the project's "
                     "Python, e.g. .venv/bin/backprop-ninja exercise 7 --check " + __file__)


def forward(x, gain, bias):
    """Batch normalisation in training mode over dims (0, 1), with the n*T - 1 variance."""
    mean = x.mean((0, 1), keepdim=True)                            # 1 x 1 x C
    var = x.var((0, 1), keepdim=True, unbiased=True)               # 1 x 1 x C, divides by n*T - 1
    var_inv = (var + 1e-5) ** -0.5                                 # 1 x 1 x C
    xhat = (x - mean) * var_inv                                    # n x T x C
    out = gain * xhat + bias                                       # n x T x C
    return dict(mean=mean, var=var, var_inv=var_inv, xhat=xhat, out=out)


def backward(x, gain, xhat, var_inv, dout):
    m = x.shape[0] * x.shape[1]
    # BLANK dgain: out = gain * xhat + bias, gain 1 x 1 x C
    dgain = (dout * xhat).sum((0, 1), keepdim=True)
    # END
    # BLANK dbias: out = gain * xhat + bias, bias 1 x 1 x C
    dbias = dout.sum((0, 1), keepdim=True)
    # END
    # BLANK dx: out = gain * (x - mean) / sqrt(var + 1e-5) + bias, mean and var over dims (0, 1)
    dx = gain * var_inv / m * (m * dout - dbias - m / (m - 1) * xhat * dgain)
    # END
    return {"gain": dgain, "bias": dbias, "x": dx}


if __name__ == "__main__":
    import sys

    try:
        from backprop_ninja.cli import main
    except ImportError:
        sys.exit("backprop-ninja is not installed in this Python: fill in the blanks, then "
                 "run the file with the project's Python, e.g. .venv/bin/backprop-ninja "
                 "exercise 7 --check " + __file__)
    sys.exit(main(["exercise", "7", "--check", __file__]))
