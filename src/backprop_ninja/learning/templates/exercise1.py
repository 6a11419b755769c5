"""Exercise 1: backpropagate through the whole network by hand, one small step at a time.

forward() below is the lecture's forward pass broken into named intermediates; it is done.
Your job is backward(): every line ``d<name> = None  # TODO: ...`` is a blank. Replace None with
the gradient of the loss with respect to <name>; the comment shows the forward line it comes from.
Fill them in from the top (the loss end) down: each one only needs the ones above it.

Contract (what the checker calls and expects):
    backward(**tensors) is called with keyword arguments: Xb, Yb, the 7 parameters (C, W1, b1,
    W2, b2, bngain, bnbias) and the 20 intermediates of forward(), each by its name. They are
    plain tensors: no autograd, and you must not use it. It returns a dict mapping each of the
    26 names (without the d) to its gradient, which must have that tensor's exact shape.

Check it (a table row per tensor, the first wrong one named, with a hint):
    backprop-ninja exercise 1 --check THIS_FILE      (or run this file with python)

Remember: a broadcast in the forward pass is a sum in the backward pass (keep the dims); a sum
forward is a broadcast backward; a tensor used twice adds up (+=) both gradients.
Dimension letters: n batch, T block_size, E n_embd, H n_hidden, V vocab size.
"""

try:
    import torch
    import torch.nn.functional as F
except ImportError:  # a Python without torch (the system's): say how to run this file
    if __name__ != "__main__":
        raise
    raise SystemExit("this Python has no torch: run the file with the project's "
                     "Python, e.g. .venv/bin/backprop-ninja exercise 1 --check " + __file__)


def forward(p, Xb, Yb):
    """The lecture's forward pass in small steps; returns every intermediate by name."""
    n = Xb.shape[0]
    emb = p["C"][Xb]                                       # n x T x E
    embcat = emb.view(n, -1)                               # n x T*E
    hprebn = embcat @ p["W1"] + p["b1"]                    # n x H
    bnmeani = 1 / n * hprebn.sum(0, keepdim=True)          # 1 x H
    bndiff = hprebn - bnmeani                              # n x H
    bndiff2 = bndiff ** 2                                  # n x H
    bnvar = 1 / (n - 1) * bndiff2.sum(0, keepdim=True)     # 1 x H, Bessel's correction: n-1
    bnvar_inv = (bnvar + 1e-5) ** -0.5                     # 1 x H
    bnraw = bndiff * bnvar_inv                             # n x H
    hpreact = p["bngain"] * bnraw + p["bnbias"]            # n x H
    h = torch.tanh(hpreact)                                # n x H
    logits = h @ p["W2"] + p["b2"]                         # n x V
    logit_maxes = logits.max(1, keepdim=True).values       # n x 1
    norm_logits = logits - logit_maxes                     # n x V, for numerical stability
    counts = norm_logits.exp()                             # n x V
    counts_sum = counts.sum(1, keepdim=True)               # n x 1
    counts_sum_inv = counts_sum ** -1                      # n x 1
    probs = counts * counts_sum_inv                        # n x V
    logprobs = probs.log()                                 # n x V
    loss = -logprobs[torch.arange(n), Yb].mean()           # scalar
    return dict(emb=emb, embcat=embcat, hprebn=hprebn, bnmeani=bnmeani, bndiff=bndiff,
                bndiff2=bndiff2, bnvar=bnvar, bnvar_inv=bnvar_inv, bnraw=bnraw, hpreact=hpreact,
                h=h, logits=logits, logit_maxes=logit_maxes, norm_logits=norm_logits, counts=counts,
                counts_sum=counts_sum, counts_sum_inv=counts_sum_inv, probs=probs,
                logprobs=logprobs, loss=loss)


def backward(Xb, Yb, C, W1, b1, W2, b2, bngain, bnbias,
             emb, embcat, hprebn, bnmeani, bndiff, bndiff2, bnvar, bnvar_inv, bnraw, hpreact,
             h, logits, logit_maxes, norm_logits, counts, counts_sum, counts_sum_inv, probs,
             logprobs, loss):
    n = Xb.shape[0]
    # BLANK dlogprobs: loss = -logprobs[range(n), Yb].mean()
    dlogprobs = torch.zeros_like(logprobs)
    dlogprobs[torch.arange(n), Yb] = -1.0 / n
    # END
    # BLANK dprobs: logprobs = probs.log()
    dprobs = (1.0 / probs) * dlogprobs
    # END
    # BLANK dcounts_sum_inv: probs = counts * counts_sum_inv  (n x V times n x 1)
    dcounts_sum_inv = (counts * dprobs).sum(1, keepdim=True)
    # END
    # BLANK dcounts_sum: counts_sum_inv = counts_sum ** -1
    dcounts_sum = -counts_sum ** -2 * dcounts_sum_inv
    # END
    # BLANK dcounts: probs = counts * counts_sum_inv; counts_sum = counts.sum(1, keepdim=True)
    dcounts = counts_sum_inv * dprobs
    dcounts += torch.ones_like(counts) * dcounts_sum
    # END
    # BLANK dnorm_logits: counts = norm_logits.exp()
    dnorm_logits = counts * dcounts
    # END
    # BLANK dlogit_maxes: norm_logits = logits - logit_maxes  (n x V minus n x 1)
    dlogit_maxes = (-dnorm_logits).sum(1, keepdim=True)
    # END
    # BLANK dlogits: norm_logits = logits - logit_maxes; logit_maxes = logits.max(1).values
    dlogits = dnorm_logits.clone()
    dlogits += F.one_hot(logits.max(1).indices, num_classes=logits.shape[1]) * dlogit_maxes
    # END
    # BLANK dh: logits = h @ W2 + b2
    dh = dlogits @ W2.T
    # END
    # BLANK dW2: logits = h @ W2 + b2
    dW2 = h.T @ dlogits
    # END
    # BLANK db2: logits = h @ W2 + b2  (b2 is 1-D, broadcast over the rows)
    db2 = dlogits.sum(0)
    # END
    # BLANK dhpreact: h = torch.tanh(hpreact)
    # (1 - h**2) * dh, with 1 - h*h as one fused multiply-add: that is how autograd's tanh
    # kernel rounds it, so this row and those below it come out bit-exact, not just close
    dhpreact = torch.addcmul(torch.ones_like(h), h, h, value=-1.0) * dh
    # END
    # BLANK dbngain: hpreact = bngain * bnraw + bnbias  (bngain is 1 x H)
    dbngain = (bnraw * dhpreact).sum(0, keepdim=True)
    # END
    # BLANK dbnbias: hpreact = bngain * bnraw + bnbias  (bnbias is 1 x H)
    dbnbias = dhpreact.sum(0, keepdim=True)
    # END
    # BLANK dbnraw: hpreact = bngain * bnraw + bnbias
    dbnraw = bngain * dhpreact
    # END
    # BLANK dbnvar_inv: bnraw = bndiff * bnvar_inv  (n x H times 1 x H)
    dbnvar_inv = (bndiff * dbnraw).sum(0, keepdim=True)
    # END
    # BLANK dbnvar: bnvar_inv = (bnvar + 1e-5) ** -0.5
    dbnvar = -0.5 * (bnvar + 1e-5) ** -1.5 * dbnvar_inv
    # END
    # BLANK dbndiff2: bnvar = 1 / (n - 1) * bndiff2.sum(0, keepdim=True)
    dbndiff2 = 1.0 / (n - 1) * torch.ones_like(bndiff2) * dbnvar
    # END
    # BLANK dbndiff: bnraw = bndiff * bnvar_inv; bndiff2 = bndiff ** 2
    dbndiff = bnvar_inv * dbnraw
    dbndiff += 2 * bndiff * dbndiff2
    # END
    # BLANK dbnmeani: bndiff = hprebn - bnmeani  (n x H minus 1 x H)
    dbnmeani = (-dbndiff).sum(0, keepdim=True)
    # END
    # BLANK dhprebn: bndiff = hprebn - bnmeani; bnmeani = 1 / n * hprebn.sum(0, keepdim=True)
    dhprebn = dbndiff.clone()
    dhprebn += 1.0 / n * torch.ones_like(hprebn) * dbnmeani
    # END
    # BLANK dembcat: hprebn = embcat @ W1 + b1
    dembcat = dhprebn @ W1.T
    # END
    # BLANK dW1: hprebn = embcat @ W1 + b1
    dW1 = embcat.T @ dhprebn
    # END
    # BLANK db1: hprebn = embcat @ W1 + b1  (b1 is 1-D, broadcast over the rows)
    db1 = dhprebn.sum(0)
    # END
    # BLANK demb: embcat = emb.view(n, -1)
    demb = dembcat.view(emb.shape)
    # END
    # BLANK dC: emb = C[Xb]  (a row of C can be looked up many times)
    dC = torch.zeros_like(C)
    for k in range(Xb.shape[0]):
        for j in range(Xb.shape[1]):
            dC[Xb[k, j]] += demb[k, j]
    # END
    return dict(logprobs=dlogprobs, probs=dprobs, counts_sum_inv=dcounts_sum_inv,
                counts_sum=dcounts_sum, counts=dcounts, norm_logits=dnorm_logits,
                logit_maxes=dlogit_maxes, logits=dlogits, h=dh, W2=dW2, b2=db2, hpreact=dhpreact,
                bngain=dbngain, bnbias=dbnbias, bnraw=dbnraw, bnvar_inv=dbnvar_inv, bnvar=dbnvar,
                bndiff2=dbndiff2, bndiff=dbndiff, bnmeani=dbnmeani, hprebn=dhprebn,
                embcat=dembcat, W1=dW1, b1=db1, emb=demb, C=dC)


if __name__ == "__main__":
    import sys

    try:
        from backprop_ninja.cli import main
    except ImportError:
        sys.exit("backprop-ninja is not installed in this Python: fill in the blanks, then "
                 "run the file with the project's Python, e.g. .venv/bin/backprop-ninja "
                 "exercise 1 --check " + __file__)
    sys.exit(main(["exercise", "1", "--check", __file__]))
