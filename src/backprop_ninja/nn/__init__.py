"""Layers: forward/backward pairs, each backward written by hand at the tensor level.

One module per family: ``embedding``, ``linear``, ``activations``, ``normalisation``, ``losses``
and ``reshape``; ``registry`` says how each layer is checked against autograd and float64 finite
differences (a layer without an entry there fails the test suite).

The contract (CS231n style): ``<layer>_forward(inputs...) -> (out, cache)`` with a typed cache
(a NamedTuple naming what is saved), and ``<layer>_backward(dout, cache) -> the gradients of the
differentiable inputs, in input order``. Integer inputs (token indices, targets) have no gradient
and are not returned. A layer never keeps state between calls: batchnorm statistics, for
example, are an explicit argument.

Dimension letters: n batch, T positions (block_size), E n_embd, H hidden width, V vocab size,
D_in / D_out the sides of a linear layer.
"""
