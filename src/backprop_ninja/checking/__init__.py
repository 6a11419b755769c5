"""Checking: every hand-written gradient against two oracles.

``gradcheck``: comparing a gradient with a reference (exact, approximately equal, max diff,
shape), autograd and float64 finite differences. ``atomic``: the lecture's exercises 1-3 on its
check setup. ``models``: a whole model's backward against autograd and finite differences.
"""
