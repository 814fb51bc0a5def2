"""hf_zero's Triton kernels, imported as `hf_zero.kernels` (never as a top-level `kernels`).

Each op has a launcher that takes the Triton path for CUDA tensors and its PyTorch reference
elsewhere, the reference itself, and an interpreter test (`TRITON_INTERPRET=1`) that runs the
kernel on CPU tensors against the reference.
"""

from .adamw import AdamHyperparams, adam_step, adam_step_reference, adam_step_triton
from .grad_stats import grad_stats, grad_stats_reference, grad_stats_triton
from .sgd import SGDHyperparams, sgd_step, sgd_step_reference, sgd_step_triton

__all__ = [
    "AdamHyperparams",
    "SGDHyperparams",
    "adam_step",
    "adam_step_reference",
    "adam_step_triton",
    "grad_stats",
    "grad_stats_reference",
    "grad_stats_triton",
    "sgd_step",
    "sgd_step_reference",
    "sgd_step_triton",
]
