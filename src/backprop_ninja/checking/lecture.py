"""The lecture's exercise 1, solved: its forward pass in small named steps and the hand-written
backward through each of them, in reverse order.

This is the reference ``checking.atomic`` proves against autograd and finite differences. The
learner's template (``learning/templates/exercise1.py``) is this code with each gradient fenced
as a blank; a test keeps the two the same, line for line.

Dimension letters: n batch, T block_size, E n_embd, H n_hidden, V vocab size.
"""

import torch
import torch.nn.functional as F


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
    dlogprobs = torch.zeros_like(logprobs)
    dlogprobs[torch.arange(n), Yb] = -1.0 / n
    dprobs = (1.0 / probs) * dlogprobs
    dcounts_sum_inv = (counts * dprobs).sum(1, keepdim=True)
    dcounts_sum = -counts_sum ** -2 * dcounts_sum_inv
    dcounts = counts_sum_inv * dprobs
    dcounts += torch.ones_like(counts) * dcounts_sum
    dnorm_logits = counts * dcounts
    dlogit_maxes = (-dnorm_logits).sum(1, keepdim=True)
    dlogits = dnorm_logits.clone()
    dlogits += F.one_hot(logits.max(1).indices, num_classes=logits.shape[1]) * dlogit_maxes
    dh = dlogits @ W2.T
    dW2 = h.T @ dlogits
    db2 = dlogits.sum(0)
    # (1 - h**2) * dh, with 1 - h*h as one fused multiply-add: that is how autograd's tanh
    # kernel rounds it, so this row and those below it come out bit-exact, not just close
    dhpreact = torch.addcmul(torch.ones_like(h), h, h, value=-1.0) * dh
    dbngain = (bnraw * dhpreact).sum(0, keepdim=True)
    dbnbias = dhpreact.sum(0, keepdim=True)
    dbnraw = bngain * dhpreact
    dbnvar_inv = (bndiff * dbnraw).sum(0, keepdim=True)
    dbnvar = -0.5 * (bnvar + 1e-5) ** -1.5 * dbnvar_inv
    dbndiff2 = 1.0 / (n - 1) * torch.ones_like(bndiff2) * dbnvar
    dbndiff = bnvar_inv * dbnraw
    dbndiff += 2 * bndiff * dbndiff2
    dbnmeani = (-dbndiff).sum(0, keepdim=True)
    dhprebn = dbndiff.clone()
    dhprebn += 1.0 / n * torch.ones_like(hprebn) * dbnmeani
    dembcat = dhprebn @ W1.T
    dW1 = embcat.T @ dhprebn
    db1 = dhprebn.sum(0)
    demb = dembcat.view(emb.shape)
    dC = torch.zeros_like(C)
    for k in range(Xb.shape[0]):
        for j in range(Xb.shape[1]):
            dC[Xb[k, j]] += demb[k, j]
    return dict(logprobs=dlogprobs, probs=dprobs, counts_sum_inv=dcounts_sum_inv,
                counts_sum=dcounts_sum, counts=dcounts, norm_logits=dnorm_logits,
                logit_maxes=dlogit_maxes, logits=dlogits, h=dh, W2=dW2, b2=db2, hpreact=dhpreact,
                bngain=dbngain, bnbias=dbnbias, bnraw=dbnraw, bnvar_inv=dbnvar_inv, bnvar=dbnvar,
                bndiff2=dbndiff2, bndiff=dbndiff, bnmeani=dbnmeani, hprebn=dhprebn,
                embcat=dembcat, W1=dW1, b1=db1, emb=demb, C=dC)
