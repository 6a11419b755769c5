"""backprop-ninja: makemore trained with hand-written, tensor-level backward passes."""

__version__ = "0.1.0"


def __getattr__(name: str):
    """``check_layer`` and ``assert_backward`` load torch only when asked for."""
    if name in ("check_layer", "assert_backward"):
        from .checking import layer
        return getattr(layer, name)
    raise AttributeError(f"module 'backprop_ninja' has no attribute {name!r}")
