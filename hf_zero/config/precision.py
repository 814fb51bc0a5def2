"""Precision names to dtypes, and what each precision needs from the engine."""

from __future__ import annotations

import torch

_DTYPES = {"auto": torch.float32, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def compute_dtype_for(precision: str) -> torch.dtype:
    """The dtype the model computes in under `precision` ("auto" means fp32 outside the Trainer)."""
    if precision not in _DTYPES:
        raise ValueError(f"precision={precision!r} is not allowed: expected 'fp32', 'bf16' or 'fp16'")
    return _DTYPES[precision]
