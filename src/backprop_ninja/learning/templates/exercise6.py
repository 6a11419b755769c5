"""Exercise 6: the causal self-attention backward, head by head.

forward() below is the heart of the transformer's attention: every position t of every head
scores each position s by q_t . k_s / sqrt(hs), the positions after t are masked out (their
scores become -inf, so the softmax gives them exactly 0), and the output y_t is the att-weighted
average of the values. The linear layers that make q, k, v from the input and the one after y
are ordinary matmuls (exercise 1). Derive the gradients on paper and fill in the blanks in
backward(), from the top down: dv and datt from dy, dscores through the softmax (the row's
normaliser depends on every score of the row), then dq and dk (the 1/sqrt(hs) scale too).

Contract (what the checker calls and expects):
    backward(q, k, v, att, dy) is called with keyword arguments: q, k and v, each
    n x nh x T x hs, the n x nh x T x T att of forward() (0 above the diagonal) and the
    n x nh x T x hs upstream gradient dy of y (plain tensors: no autograd, and you must not use
    it). It returns a dict {"v": dv, "att": datt, "scores": dscores, "q": dq, "k": dk}, each
    gradient of its tensor's shape; scores are q @ k^T / sqrt(hs), before the mask.

Check it:
    backprop-ninja exercise 6 --check THIS_FILE      (or run this file with python)

Dimension letters: n batch, nh heads, T positions, hs head size (n_embd / nh).
"""

try:
    import math
except ImportError:  # a Python without torch (the system's): say how to run this file
    if __name__ != "__main__":
        raise
    raise SystemExit("this Python has no torch: run the file with the project's "
                     "Python, e.g. .venv/bin/backprop-ninja exercise 6 --check " + __file__)

import torch


def forward(q, k, v):
    """Causal attention: position t sees positions 0..t of the same sequence and head."""
    T, hs = q.shape[-2], q.shape[-1]
    scores = q @ k.transpose(-2, -1) / math.sqrt(hs)               # n x nh x T x T
    mask = torch.ones(T, T, dtype=torch.bool).tril()               # True where s <= t
    att = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    y = att @ v                                                    # n x nh x T x hs
    return dict(scores=scores, att=att, y=y)


def backward(q, k, v, att, dy):
    hs = q.shape[-1]
    # BLANK dv: y = att @ v
    dv = att.transpose(-2, -1) @ dy
    # END
    # BLANK datt: y = att @ v
    datt = dy @ v.transpose(-2, -1)
    # END
    # BLANK dscores: att = softmax(scores masked above the diagonal), over the last dim
    dscores = att * (datt - (att * datt).sum(-1, keepdim=True))
    # END
    # BLANK dq: scores = q @ k^T / sqrt(hs)
    dq = dscores @ k / math.sqrt(hs)
    # END
    # BLANK dk: scores = q @ k^T / sqrt(hs)
    dk = dscores.transpose(-2, -1) @ q / math.sqrt(hs)
    # END
    return {"v": dv, "att": datt, "scores": dscores, "q": dq, "k": dk}


if __name__ == "__main__":
    import sys

    try:
        from backprop_ninja.cli import main
    except ImportError:
        sys.exit("backprop-ninja is not installed in this Python: fill in the blanks, then "
                 "run the file with the project's Python, e.g. .venv/bin/backprop-ninja "
                 "exercise 6 --check " + __file__)
    sys.exit(main(["exercise", "6", "--check", __file__]))
