"""What the fused optimizer steps share: the 16-bit copy their kernels write beside the updated fp32
master, and the overflow skip of their host-side (PyTorch) paths."""

from __future__ import annotations

import torch

from ._triton import tl, triton


def skipped_on_host(grad: torch.Tensor, zero_grad: bool, found_inf: torch.Tensor | None) -> bool:
    """Whether `found_inf` says this step overflowed; then only the gradient reset (`zero_grad`) is
    done, as the kernels do when they see the flag."""
    if found_inf is None or not bool(found_inf.item()):
        return False
    if zero_grad:
        grad.zero_()
    return True


def out_mode(out: torch.Tensor | None) -> int:
    """How a kernel writes `out`: 0 not at all, 1 bf16 rounded by hand, 2 a native cast."""
    return 0 if out is None else (1 if out.dtype == torch.bfloat16 else 2)


if triton is not None:

    @triton.jit
    def store_copy(out_ptr, offsets, p, mask, OUT_MODE: tl.constexpr):
        """Store fp32 `p` into `out_ptr` per `out_mode`, rounded to nearest even."""
        if OUT_MODE == 1:
            # Round to nearest even explicitly: Triton's interpreter truncates float32 -> bf16.
            bits = p.to(tl.uint32, bitcast=True)
            rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
            rounded = tl.where(p != p, 0x7FC0, rounded)  # keep NaN a NaN
            tl.store(out_ptr + offsets, rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
        elif OUT_MODE == 2:
            tl.store(out_ptr + offsets, p.to(out_ptr.dtype.element_ty), mask=mask)
