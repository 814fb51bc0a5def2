"""Triton where it is installed (it is Linux-only); None elsewhere, where the PyTorch references run."""

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = tl = None

__all__ = ["tl", "triton"]
