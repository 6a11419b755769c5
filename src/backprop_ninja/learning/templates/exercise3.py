"""Exercise 3: the batchnorm backward in one formula, instead of eight small steps.

forward() below is the batchnorm stretch of the forward pass, from hprebn to hpreact, with the
batch variance divided by n-1 (Bessel's correction) as in the lecture. Derive dhprebn from
dhpreact on paper (mean, variance and the normalisation all depend on every row of the batch)
and fill in the blank in backward(): replace None with dhprebn.

Contract (what the checker calls and expects):
    backward(hprebn, bngain, bnvar_inv, bnraw, dhpreact) is called with keyword arguments: the
    n x H input hprebn, the 1 x H gain, the 1 x H bnvar_inv and the n x H bnraw of forward(),
    and the n x H upstream gradient dhpreact, all from the lecture's check batch (plain tensors:
    no autograd, and you must not use it). It returns a dict {"hprebn": dhprebn}, n x H.

Check it:
    backprop-ninja exercise 3 --check THIS_FILE      (or run this file with python)

Dimension letters: n batch, H n_hidden.
"""



def forward(hprebn, bngain, bnbias):
    """Batch normalisation in training mode, with the unbiased (n-1) batch variance."""
    bnmean = hprebn.mean(0, keepdim=True)                          # 1 x H
    bnvar = hprebn.var(0, keepdim=True, unbiased=True)             # 1 x H, divides by n-1
    bnvar_inv = (bnvar + 1e-5) ** -0.5                             # 1 x H
    bnraw = (hprebn - bnmean) * bnvar_inv                          # n x H
    hpreact = bngain * bnraw + bnbias                              # n x H
    return dict(bnmean=bnmean, bnvar=bnvar, bnvar_inv=bnvar_inv, bnraw=bnraw, hpreact=hpreact)


def backward(hprebn, bngain, bnvar_inv, bnraw, dhpreact):
    n = hprebn.shape[0]
    # BLANK dhprebn: hpreact = bngain * (hprebn - mean) / sqrt(var + 1e-5) + bnbias, var with n-1
    dhprebn = bngain * bnvar_inv / n * (
        n * dhpreact - dhpreact.sum(0) - n / (n - 1) * bnraw * (dhpreact * bnraw).sum(0))
    # END
    return {"hprebn": dhprebn}


if __name__ == "__main__":
    import sys

    try:
        from backprop_ninja.cli import main
    except ImportError:
        sys.exit("backprop-ninja is not installed in this Python: fill in the blank, then "
                 "run the file with the project's Python, e.g. .venv/bin/backprop-ninja "
                 "exercise 3 --check " + __file__)
    sys.exit(main(["exercise", "3", "--check", __file__]))
