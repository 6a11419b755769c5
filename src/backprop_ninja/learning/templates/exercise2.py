"""Exercise 2: the cross-entropy backward in one line, instead of eight small ones.

forward() below is the stretch of the forward pass from logits to the loss, written the way
F.cross_entropy computes it. Derive the gradient of the loss with respect to the logits on paper
(softmax, then -log of the probability of the correct class, then the mean over the batch) and
fill in the blank in backward(): replace None with dlogits.

Contract (what the checker calls and expects):
    backward(logits, Yb) is called with the n x V logits of the lecture's check batch and its n
    targets (plain tensors: no autograd, and you must not use it). It returns a dict
    {"logits": dlogits}, dlogits of shape n x V.

Check it:
    backprop-ninja exercise 2 --check THIS_FILE      (or run this file with python)

Each row of a correct dlogits sums to zero; see it with: backprop-ninja plot dlogits --out FILE.png
Dimension letters: n batch, V vocab size.
"""

try:
    import torch
    import torch.nn.functional as F
except ImportError:  # a Python without torch (the system's): say how to run this file
    if __name__ != "__main__":
        raise
    raise SystemExit("this Python has no torch: run the file with the project's "
                     "Python, e.g. .venv/bin/backprop-ninja exercise 2 --check " + __file__)


def forward(logits, Yb):
    """loss = mean over the rows of -log softmax(logits)[row, Yb[row]]."""
    return F.cross_entropy(logits, Yb)


def backward(logits, Yb):
    n = logits.shape[0]
    # BLANK dlogits: loss = F.cross_entropy(logits, Yb)
    dlogits = F.softmax(logits, 1)
    dlogits[torch.arange(n), Yb] -= 1
    dlogits /= n
    # END
    return {"logits": dlogits}


if __name__ == "__main__":
    import sys

    try:
        from backprop_ninja.cli import main
    except ImportError:
        sys.exit("backprop-ninja is not installed in this Python: fill in the blank, then "
                 "run the file with the project's Python, e.g. .venv/bin/backprop-ninja "
                 "exercise 2 --check " + __file__)
    sys.exit(main(["exercise", "2", "--check", __file__]))
