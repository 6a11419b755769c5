"""Exercise 4: train the network with your own backward pass, no autograd anywhere.

forward() below is the training forward pass, with the fused cross-entropy and batchnorm of
exercises 2 and 3 in mind: it keeps only the intermediates a fused backward needs. Fill in the
blanks of backward(), one gradient per layer, from the loss down to the embedding table.

Contract (what the checker calls and expects):
    backward(**tensors) is called with keyword arguments: Xb, Yb, the 7 parameters (C, W1, b1,
    W2, b2, bngain, bnbias) and the intermediates of forward() (emb, embcat, hprebn, bnmean,
    bnvar, bnvar_inv, bnraw, hpreact, h, logits, loss), each by its name. They are plain
    tensors: no autograd, and you must not use it. It returns a dict mapping each parameter's
    name to its gradient, of the parameter's exact shape.

Check it (one batch against autograd, then a short training run against the reference's):
    backprop-ninja exercise 4 --check THIS_FILE      (or run this file with python)

Dimension letters: n batch, T block_size, E n_embd, H n_hidden, V vocab size.
"""

try:
    import torch
    import torch.nn.functional as F
except ImportError:  # a Python without torch (the system's): say how to run this file
    if __name__ != "__main__":
        raise
    raise SystemExit("this Python has no torch: run the file with the project's "
                     "Python, e.g. .venv/bin/backprop-ninja exercise 4 --check " + __file__)


def forward(p, Xb, Yb):
    """The training forward pass; returns the intermediates the backward pass needs."""
    n = Xb.shape[0]
    emb = p["C"][Xb]                                       # n x T x E
    embcat = emb.view(n, -1)                               # n x T*E
    hprebn = embcat @ p["W1"] + p["b1"]                    # n x H
    bnmean = hprebn.mean(0, keepdim=True)                  # 1 x H
    bnvar = hprebn.var(0, keepdim=True, unbiased=True)     # 1 x H, divides by n-1
    bnvar_inv = (bnvar + 1e-5) ** -0.5                     # 1 x H
    bnraw = (hprebn - bnmean) * bnvar_inv                  # n x H
    hpreact = p["bngain"] * bnraw + p["bnbias"]            # n x H
    h = torch.tanh(hpreact)                                # n x H
    logits = h @ p["W2"] + p["b2"]                         # n x V
    loss = F.cross_entropy(logits, Yb)                     # scalar
    return dict(emb=emb, embcat=embcat, hprebn=hprebn, bnmean=bnmean, bnvar=bnvar,
                bnvar_inv=bnvar_inv, bnraw=bnraw, hpreact=hpreact, h=h, logits=logits, loss=loss)


def backward(Xb, Yb, C, W1, b1, W2, b2, bngain, bnbias,
             emb, embcat, hprebn, bnmean, bnvar, bnvar_inv, bnraw, hpreact, h, logits, loss):
    n = Xb.shape[0]
    # BLANK dlogits: loss = F.cross_entropy(logits, Yb)  (exercise 2)
    dlogits = F.softmax(logits, 1)
    dlogits[torch.arange(n), Yb] -= 1
    dlogits /= n
    # END
    # BLANK dh: logits = h @ W2 + b2
    dh = dlogits @ W2.T
    # END
    # BLANK dW2: logits = h @ W2 + b2
    dW2 = h.T @ dlogits
    # END
    # BLANK db2: logits = h @ W2 + b2
    db2 = dlogits.sum(0)
    # END
    # BLANK dhpreact: h = torch.tanh(hpreact)
    dhpreact = (1.0 - h ** 2) * dh
    # END
    # BLANK dbngain: hpreact = bngain * bnraw + bnbias
    dbngain = (bnraw * dhpreact).sum(0, keepdim=True)
    # END
    # BLANK dbnbias: hpreact = bngain * bnraw + bnbias
    dbnbias = dhpreact.sum(0, keepdim=True)
    # END
    # BLANK dhprebn: batchnorm, hprebn -> hpreact  (exercise 3)
    dhprebn = bngain * bnvar_inv / n * (
        n * dhpreact - dhpreact.sum(0) - n / (n - 1) * bnraw * (dhpreact * bnraw).sum(0))
    # END
    # BLANK dembcat: hprebn = embcat @ W1 + b1
    dembcat = dhprebn @ W1.T
    # END
    # BLANK dW1: hprebn = embcat @ W1 + b1
    dW1 = embcat.T @ dhprebn
    # END
    # BLANK db1: hprebn = embcat @ W1 + b1
    db1 = dhprebn.sum(0)
    # END
    # BLANK demb: embcat = emb.view(n, -1)
    demb = dembcat.view(emb.shape)
    # END
    # BLANK dC: emb = C[Xb]  (a row of C can be looked up many times)
    dC = torch.zeros_like(C)
    dC.index_add_(0, Xb.view(-1), demb.view(-1, C.shape[1]))
    # END
    return dict(C=dC, W1=dW1, b1=db1, W2=dW2, b2=db2, bngain=dbngain, bnbias=dbnbias)


if __name__ == "__main__":
    import sys

    try:
        from backprop_ninja.cli import main
    except ImportError:
        sys.exit("backprop-ninja is not installed in this Python: fill in the blanks, then "
                 "run the file with the project's Python, e.g. .venv/bin/backprop-ninja "
                 "exercise 4 --check " + __file__)
    sys.exit(main(["exercise", "4", "--check", __file__]))
