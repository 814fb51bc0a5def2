"""Fused SGD step (momentum, dampening, Nesterov, L2 weight decay) over one flat fp32 shard, in one
memory pass.

Per element: scale the gradient (1/world, fp16 unscale and clip in one device factor), add the
weight decay, update the momentum buffer, update the fp32 master, write its 16-bit copy and
optionally reset the gradient accumulator. A device flag skips the update (fp16 overflow) as in
`adam_step`. The arithmetic follows `torch.optim.SGD`'s single-tensor implementation, so the
reference matches it exactly and the kernel to float32 rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._triton import tl, triton
from .copy16 import out_mode, skipped_on_host

if triton is not None:
    from .copy16 import store_copy

BLOCK_SIZE = 2048


@dataclass(frozen=True)
class SGDHyperparams:
    """One step's scalars. `first` means the momentum buffer does not exist yet: it starts as the
    step's gradient, as torch's SGD starts it."""

    lr: float
    momentum: float
    dampening: float
    weight_decay: float
    nesterov: bool
    first: bool


def sgd_step_reference(
    param: torch.Tensor,
    grad: torch.Tensor,
    momentum_buffer: torch.Tensor | None,
    out: torch.Tensor | None,
    hp: SGDHyperparams,
    grad_scale: torch.Tensor | None = None,
    zero_grad: bool = False,
    found_inf: torch.Tensor | None = None,
) -> None:
    """The fused step in PyTorch operations (in place). See `sgd_step` for the arguments."""
    if skipped_on_host(grad, zero_grad, found_inf):
        return
    g = grad.float()
    if grad_scale is not None:
        g = g * grad_scale
    if hp.weight_decay != 0:
        g = g.add(param, alpha=hp.weight_decay)
    if hp.momentum != 0:
        if hp.first:
            momentum_buffer.copy_(g)
        else:
            momentum_buffer.mul_(hp.momentum).add_(g, alpha=1 - hp.dampening)
        g = g.add(momentum_buffer, alpha=hp.momentum) if hp.nesterov else momentum_buffer
    param.add_(g, alpha=-hp.lr)
    if out is not None:
        out.copy_(param)
    if zero_grad:
        grad.zero_()


if triton is not None:

    @triton.jit
    def _sgd_kernel(
        param_ptr,
        grad_ptr,
        buf_ptr,
        out_ptr,
        scale_ptr,
        skip_ptr,
        n,
        lr,
        momentum,
        dampening,
        weight_decay,
        HAS_MOMENTUM: tl.constexpr,
        FIRST: tl.constexpr,
        NESTEROV: tl.constexpr,
        HAS_SCALE: tl.constexpr,
        HAS_SKIP: tl.constexpr,
        OUT_MODE: tl.constexpr,  # see copy16.out_mode
        ZERO_GRAD: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n
        # One skip flag per launch, read once (see adamw.py: folded into the mask it costs the vector
        # accesses). A skipped step touches no memory but the gradient reset.
        update = tl.load(skip_ptr) == 0 if HAS_SKIP else True
        if update:
            p = tl.load(param_ptr + offsets, mask=mask)
            g = tl.load(grad_ptr + offsets, mask=mask).to(tl.float32)
            if HAS_SCALE:
                g = g * tl.load(scale_ptr)
            g = g + weight_decay * p
            if HAS_MOMENTUM:
                if FIRST:
                    buf = g
                else:
                    buf = tl.load(buf_ptr + offsets, mask=mask)
                    buf = buf * momentum + (1 - dampening) * g
                tl.store(buf_ptr + offsets, buf, mask=mask)
                if NESTEROV:  # noqa: SIM108 (a compile-time branch in Triton)
                    g = g + momentum * buf
                else:
                    g = buf
            p = p - lr * g
            tl.store(param_ptr + offsets, p, mask=mask)
            store_copy(out_ptr, offsets, p, mask, OUT_MODE)
        if ZERO_GRAD:
            tl.store(grad_ptr + offsets, tl.zeros([BLOCK], grad_ptr.dtype.element_ty), mask=mask)


def sgd_step_triton(
    param: torch.Tensor,
    grad: torch.Tensor,
    momentum_buffer: torch.Tensor | None,
    out: torch.Tensor | None,
    hp: SGDHyperparams,
    grad_scale: torch.Tensor | None = None,
    zero_grad: bool = False,
    found_inf: torch.Tensor | None = None,
) -> None:
    """The fused step as one Triton launch. See `sgd_step` for the arguments."""
    if triton is None:
        raise RuntimeError("Triton is not installed; use sgd_step_reference")
    n = param.numel()
    for name, tensor in (("grad", grad), ("momentum_buffer", momentum_buffer), ("out", out)):
        if tensor is not None and (tensor.numel() != n or not tensor.is_contiguous()):
            raise ValueError(f"sgd_step: {name} must be contiguous with {n} elements like param")
    if param.dtype != torch.float32 or (
        momentum_buffer is not None and momentum_buffer.dtype != torch.float32
    ):
        raise ValueError("sgd_step: param and momentum_buffer must be float32")
    if hp.momentum != 0 and momentum_buffer is None:
        raise ValueError("sgd_step: momentum needs a momentum_buffer")
    if n == 0:
        return
    _sgd_kernel[(triton.cdiv(n, BLOCK_SIZE),)](
        param, grad,
        momentum_buffer if momentum_buffer is not None else param,
        out if out is not None else param,
        grad_scale if grad_scale is not None else param,
        found_inf if found_inf is not None else param,
        n, hp.lr, hp.momentum, hp.dampening, hp.weight_decay,
        HAS_MOMENTUM=hp.momentum != 0, FIRST=hp.first, NESTEROV=hp.nesterov,
        HAS_SCALE=grad_scale is not None, HAS_SKIP=found_inf is not None,
        OUT_MODE=out_mode(out), ZERO_GRAD=zero_grad, BLOCK=BLOCK_SIZE, num_warps=8,
    )  # fmt: skip


def sgd_step(
    param: torch.Tensor,
    grad: torch.Tensor,
    momentum_buffer: torch.Tensor | None,
    out: torch.Tensor | None,
    hp: SGDHyperparams,
    grad_scale: torch.Tensor | None = None,
    zero_grad: bool = False,
    found_inf: torch.Tensor | None = None,
) -> None:
    """One SGD step over flat tensors, in place: Triton on CUDA, the reference elsewhere.

    Args:
        param: fp32 master weights (updated).
        grad: the gradient, fp32 or 16-bit (zeroed afterwards when `zero_grad`).
        momentum_buffer: fp32 momentum buffer (updated; with `hp.first` only written), or None
            without momentum.
        out: where to write the updated weights in the compute dtype, or None.
        hp: learning rate, momentum, dampening, weight decay, Nesterov, first step.
        grad_scale: a one-element device tensor multiplied into the gradient first, or None.
        zero_grad: reset `grad` to zero on the way (also when the step is skipped).
        found_inf: a one-element device tensor; nonzero skips the update (fp16 overflow), or None.
    """
    step = sgd_step_triton if param.is_cuda and triton is not None else sgd_step_reference
    step(param, grad, momentum_buffer, out, hp, grad_scale, zero_grad, found_inf)
