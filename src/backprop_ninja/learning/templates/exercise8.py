"""Exercise 8: an RNN's backward pass through time.

forward() below is makemore's RNN cell applied to T steps: each step concatenates the input x_t
with the previous state h_{t-1}, applies one linear layer w, b to the pair and a tanh; the start
state h0 is a learned parameter shared by every sequence of the batch. Every state h_t is read
twice: by the output at step t (its gradient dhs[:, t] is given) and by step t+1. Fill in the
blanks in backward(), from the top down: first da, the gradient of every step's pre-activation,
in a loop that runs from the last step to the first and carries the gradient of h_{t-1} back
to the step before; then dx, dh0, dw and db from da.

Contract (what the checker calls and expects):
    backward(x, h0, w, hs, dhs) is called with keyword arguments: the n x T x C input x, the H
    start state h0, the (C + H) x H weight w (rows :C read x_t, rows C: read h_{t-1}), the
    n x T x H states hs of forward() and the n x T x H upstream gradient dhs (plain tensors: no
    autograd, and you must not use it). It returns a dict
    {"a": da, "x": dx, "h0": dh0, "w": dw, "b": db}, each gradient of its tensor's shape
    (a: n x T x H, the pre-activations of forward()).

Check it:
    backprop-ninja exercise 8 --check THIS_FILE      (or run this file with python)

Dimension letters: n batch, T steps, C input width, H hidden width.
"""

try:
    import torch
except ImportError:  # a Python without torch (the system's): say how to run this file
    if __name__ != "__main__":
        raise
    raise SystemExit("this Python has no torch: run the file with the project's "
                     "Python, e.g. .venv/bin/backprop-ninja exercise 8 --check " + __file__)


def forward(x, h0, w, b):
    """h_t = tanh([x_t, h_{t-1}] @ w + b) for t = 0..T-1, starting from h0 in every row."""
    n, T, C = x.shape
    h = h0.expand(n, -1)                                           # n x H
    pre, states = [], []
    for t in range(T):
        a = torch.cat([x[:, t], h], 1) @ w + b                     # n x H
        h = torch.tanh(a)
        pre.append(a)
        states.append(h)
    return dict(a=torch.stack(pre, 1), hs=torch.stack(states, 1))  # n x T x H each


def backward(x, h0, w, hs, dhs):
    n, T, C = x.shape
    # BLANK da: h_t = tanh(a_t), h_t read by the output at t and by step t+1
    da = torch.zeros_like(hs)
    dh = torch.zeros_like(hs[:, 0])                                # carried back from step t+1
    for t in reversed(range(T)):
        da[:, t] = (dhs[:, t] + dh) * (1 - hs[:, t] ** 2)
        dh = da[:, t] @ w[C:].T
    # END
    # BLANK dx: a_t = [x_t, h_{t-1}] @ w + b
    dx = da @ w[:C].T
    # END
    # BLANK dh0: h_{-1} = h0 for every sequence of the batch
    dh0 = (da[:, 0] @ w[C:].T).sum(0)
    # END
    # BLANK dw: a_t = [x_t, h_{t-1}] @ w + b, the same w at every step
    h_prev = torch.cat([h0.expand(n, 1, -1), hs[:, :-1]], 1)       # n x T x H: each step's h_{t-1}
    dw = torch.cat([x, h_prev], 2).reshape(n * T, -1).T @ da.reshape(n * T, -1)
    # END
    # BLANK db: a_t = [x_t, h_{t-1}] @ w + b, the same b at every step
    db = da.sum((0, 1))
    # END
    return {"a": da, "x": dx, "h0": dh0, "w": dw, "b": db}


if __name__ == "__main__":
    import sys

    try:
        from backprop_ninja.cli import main
    except ImportError:
        sys.exit("backprop-ninja is not installed in this Python: fill in the blanks, then "
                 "run the file with the project's Python, e.g. .venv/bin/backprop-ninja "
                 "exercise 8 --check " + __file__)
    sys.exit(main(["exercise", "8", "--check", __file__]))
