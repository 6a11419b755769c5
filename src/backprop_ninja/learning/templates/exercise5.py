"""Exercise 5: the layer normalisation backward, fused, as the transformer uses it.

forward() below is GPT-2's layer normalisation: each position of each sequence (each row of C
features) is normalised by its own mean and biased variance (divided by C, not C-1) over its C
features, then scaled by weight and shifted by bias, both shared by every row. Derive the
gradients on paper and fill in the blanks in backward(), from the top down: dxhat, dweight and
dbias from dout, then dx from dxhat in one formula (the mean and the variance of a row depend on
every feature of that row).

Contract (what the checker calls and expects):
    backward(x, weight, xhat, rstd, dout) is called with keyword arguments: the n x T x C input
    x, the C weight, the n x T x C xhat and the n x T x 1 rstd of forward(), and the n x T x C
    upstream gradient dout (plain tensors: no autograd, and you must not use it). It returns a
    dict {"xhat": dxhat, "weight": dweight, "bias": dbias, "x": dx}, each gradient of its
    tensor's shape.

Check it:
    backprop-ninja exercise 5 --check THIS_FILE      (or run this file with python)

Dimension letters: n batch, T positions, C features (n_embd).
"""

try:
    import torch
except ImportError:  # a Python without torch (the system's): say how to run this file
    if __name__ != "__main__":
        raise
    raise SystemExit("this Python has no torch: run the file with the project's "
                     "Python, e.g. .venv/bin/backprop-ninja exercise 5 --check " + __file__)


def forward(x, weight, bias):
    """Layer normalisation over the last dim, with the biased (divide by C) variance."""
    mean = x.mean(-1, keepdim=True)                                # n x T x 1
    var = ((x - mean) ** 2).mean(-1, keepdim=True)                 # n x T x 1, divides by C
    rstd = (var + 1e-5) ** -0.5                                    # n x T x 1
    xhat = (x - mean) * rstd                                       # n x T x C
    out = weight * xhat + bias                                     # n x T x C
    return dict(mean=mean, var=var, rstd=rstd, xhat=xhat, out=out)


def backward(x, weight, xhat, rstd, dout):
    C = x.shape[-1]
    # BLANK dxhat: out = weight * xhat + bias
    dxhat = dout * weight
    # END
    # BLANK dweight: out = weight * xhat + bias, weight shared by all n x T rows
    dweight = (dout * xhat).sum((0, 1))
    # END
    # BLANK dbias: out = weight * xhat + bias, bias shared by all n x T rows
    dbias = dout.sum((0, 1))
    # END
    # BLANK dx: xhat = (x - mean) * rstd, mean and var over the C features of each row
    dx = rstd / C * (C * dxhat - dxhat.sum(-1, keepdim=True)
                     - xhat * (dxhat * xhat).sum(-1, keepdim=True))
    # END
    return {"xhat": dxhat, "weight": dweight, "bias": dbias, "x": dx}


if __name__ == "__main__":
    import sys

    try:
        from backprop_ninja.cli import main
    except ImportError:
        sys.exit("backprop-ninja is not installed in this Python: fill in the blanks, then "
                 "run the file with the project's Python, e.g. .venv/bin/backprop-ninja "
                 "exercise 5 --check " + __file__)
    sys.exit(main(["exercise", "5", "--check", __file__]))
