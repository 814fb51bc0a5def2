"""hf_zero's Triton kernels, imported as `hf_zero.kernels` (never as a top-level `kernels`).

Each op has a launcher that takes the Triton path for CUDA tensors and its PyTorch reference
elsewhere, the reference itself, and an interpreter test (`TRITON_INTERPRET=1`) that runs the
kernel on CPU tensors against the reference.
"""

from .adamw import AdamHyperparams, adam_step, adam_step_reference, adam_step_triton

__all__ = ["AdamHyperparams", "adam_step", "adam_step_reference", "adam_step_triton"]
