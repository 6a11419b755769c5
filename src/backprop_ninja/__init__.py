"""backprop-ninja: makemore trained with hand-written, tensor-level backward passes."""

__version__ = "0.1.0"
