"""hf_zero's version, in a module of its own so that any part of the package can name it without
importing the package's public names (and through them the engine)."""

__version__ = "0.1.0"
