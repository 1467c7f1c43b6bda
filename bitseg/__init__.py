"""bitseg: a bitmap-index segment server."""

__version__ = "0.1.0"
