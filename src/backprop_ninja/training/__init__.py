"""Training: the steps (hand-written, fused, and autograd as a reference), the loop, the work
directory it writes, sampling from a trained run, and the benchmark of the steps."""
