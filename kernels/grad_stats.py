"""Gradient statistics in one read of the flat gradient shards: the sum of squares (for the global
norm and clipping) and the number of non-finite elements (fp16 overflow).

The result is one fp32 device tensor `[sum of squares, non-finite count]`, so the engine sends
both over the ranks in a single all-reduce and turns them into the clip coefficient and the skip
flag on the device, without the host waiting. The sum is taken over the values as stored (still
multiplied by the loss scale and summed over ranks); the engine multiplies the norm by the
unscale factor afterwards, which is exact for the power-of-two loss scales.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._triton import tl, triton

BLOCK_SIZE = 4096
MAX_PROGRAMS = 1024  # enough to fill any GPU; each program loops over its share of blocks
_CPU_CHUNK = 1 << 22


def grad_stats_reference(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """`[Σx², count of non-finite x]` over `grads` in PyTorch operations (fp32, on their device).

    On the CPU, whose reductions accumulate sequentially within a chunk, the sum is taken over
    bounded chunks and the chunk sums added, which keeps the relative error near float32
    rounding for shards of any size.
    """
    device = grads[0].device if grads else torch.device("cpu")
    stats = torch.zeros(2, dtype=torch.float32, device=device)
    for grad in grads:
        for chunk in grad.reshape(-1).split(_CPU_CHUNK):
            values = chunk.float()
            stats[0] += values.pow(2).sum()
            stats[1] += (~torch.isfinite(values)).sum()
    return stats


if triton is not None:

    @triton.jit
    def _grad_stats_kernel(grad_ptr, partial_ptr, n, blocks_per_program, BLOCK: tl.constexpr):
        program = tl.program_id(0)
        squares = tl.zeros([BLOCK], dtype=tl.float32)
        bad = tl.zeros([BLOCK], dtype=tl.float32)
        first = program.to(tl.int64) * blocks_per_program
        for block in range(0, blocks_per_program):
            offsets = (first + block) * BLOCK + tl.arange(0, BLOCK)
            mask = offsets < n
            g = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            squares += g * g
            # NaN fails every comparison, and infinity exceeds the largest float: both count.
            bad += tl.where(tl.abs(g) <= 3.4028234663852886e38, 0.0, 1.0)
        tl.store(partial_ptr + 2 * program, tl.sum(squares, axis=0))
        tl.store(partial_ptr + 2 * program + 1, tl.sum(bad, axis=0))


def grad_stats_triton(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """`grad_stats` with one Triton launch per tensor; per-program partial sums are added in a fixed
    order afterwards, so the result does not depend on scheduling."""
    if triton is None:
        raise RuntimeError("Triton is not installed; use grad_stats_reference")
    grads = [g for g in grads if g.numel()]
    if not grads:
        return torch.zeros(2, dtype=torch.float32)
    plans = []
    for grad in grads:
        if not grad.is_contiguous():
            raise ValueError("grad_stats: gradients must be contiguous")
        blocks = triton.cdiv(grad.numel(), BLOCK_SIZE)
        programs = min(blocks, MAX_PROGRAMS)
        plans.append((grad, programs, triton.cdiv(blocks, programs)))
    partials = torch.empty(sum(p for _, p, _ in plans), 2, dtype=torch.float32, device=grads[0].device)
    start = 0
    for grad, programs, per_program in plans:
        _grad_stats_kernel[(programs,)](
            grad, partials[start : start + programs], grad.numel(), per_program, BLOCK=BLOCK_SIZE, num_warps=8
        )
        start += programs
    return partials.sum(dim=0)


def grad_stats(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """`[Σx², count of non-finite x]` over the flat tensors `grads` as one fp32 device tensor, in one
    read of each: Triton on CUDA, the reference elsewhere. Nothing is copied to the host."""
    use_triton = triton is not None and bool(grads) and all(g.is_cuda for g in grads)
    return grad_stats_triton(grads) if use_triton else grad_stats_reference(grads)
