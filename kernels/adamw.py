"""Fused Adam/AdamW step over one flat fp32 shard, in one memory pass.

Per element: scale the gradient (1/world, the fp16 unscale and the clip coefficient folded into
one factor, read from a device scalar so the host never waits for the norm), apply weight decay (decoupled for AdamW, L2 for
Adam), update both moments, update the fp32 master, write its 16-bit copy for the all-gather,
and optionally reset the gradient accumulator. Unfused, the same work is five to seven passes.
A device flag (fp16: a non-finite gradient somewhere) turns the step into nothing but the
gradient reset, again without the host reading it: weights and moments are left bit-identical.

The arithmetic follows `torch.optim.Adam`'s single-tensor implementation operation by operation,
so the result matches it to float32 rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ._triton import tl, triton
from .copy16 import out_mode, skipped_on_host

if triton is not None:
    from .copy16 import store_copy

BLOCK_SIZE = 2048


@dataclass(frozen=True)
class AdamHyperparams:
    """One step's scalars. `step` is the step number after incrementing (1 on the first step)."""

    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    step: int
    decoupled: bool

    @property
    def step_size(self) -> float:
        return self.lr / (1 - self.beta1**self.step)

    @property
    def bias_correction2_sqrt(self) -> float:
        return math.sqrt(1 - self.beta2**self.step)


def adam_step_reference(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    out: torch.Tensor | None,
    hp: AdamHyperparams,
    grad_scale: torch.Tensor | None = None,
    zero_grad: bool = False,
    found_inf: torch.Tensor | None = None,
) -> None:
    """The fused step in PyTorch operations (in place). See `adam_step` for the arguments."""
    if skipped_on_host(grad, zero_grad, found_inf):
        return
    g = grad.float()
    if grad_scale is not None:
        g = g * grad_scale
    if hp.weight_decay != 0:
        if hp.decoupled:
            param.mul_(1 - hp.lr * hp.weight_decay)
        else:
            g = g.add(param, alpha=hp.weight_decay)
    exp_avg.lerp_(g, 1 - hp.beta1)
    exp_avg_sq.mul_(hp.beta2).addcmul_(g, g, value=1 - hp.beta2)
    denom = (exp_avg_sq.sqrt() / hp.bias_correction2_sqrt).add_(hp.eps)
    param.addcdiv_(exp_avg, denom, value=-hp.step_size)
    if out is not None:
        out.copy_(param)
    if zero_grad:
        grad.zero_()


if triton is not None:

    @triton.jit
    def _adam_kernel(
        param_ptr,
        grad_ptr,
        exp_avg_ptr,
        exp_avg_sq_ptr,
        out_ptr,
        scale_ptr,
        skip_ptr,
        n,
        lr,
        beta1,
        beta2,
        eps,
        weight_decay,
        step_size,
        bias_correction2_sqrt,
        DECOUPLED: tl.constexpr,
        HAS_SCALE: tl.constexpr,
        HAS_SKIP: tl.constexpr,
        OUT_MODE: tl.constexpr,  # see copy16.out_mode
        ZERO_GRAD: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n
        # The skip flag is one value for the whole launch: read it once and branch, so no mask depends
        # on it. Folded into the per-element mask it hid that the mask is uniform over each 16-byte
        # vector, and every access compiled to scalar loads and stores. A skipped step touches no
        # memory but the gradient reset.
        update = tl.load(skip_ptr) == 0 if HAS_SKIP else True
        if update:
            p = tl.load(param_ptr + offsets, mask=mask)
            g = tl.load(grad_ptr + offsets, mask=mask).to(tl.float32)
            m = tl.load(exp_avg_ptr + offsets, mask=mask)
            v = tl.load(exp_avg_sq_ptr + offsets, mask=mask)
            if HAS_SCALE:
                g = g * tl.load(scale_ptr)
            if DECOUPLED:
                p = p * (1 - lr * weight_decay)
            else:
                g = g + weight_decay * p
            m = m + (1 - beta1) * (g - m)
            v = v * beta2 + (1 - beta2) * (g * g)
            denom = tl.sqrt_rn(v) / bias_correction2_sqrt + eps
            p = p - step_size * tl.div_rn(m, denom)
            tl.store(param_ptr + offsets, p, mask=mask)
            tl.store(exp_avg_ptr + offsets, m, mask=mask)
            tl.store(exp_avg_sq_ptr + offsets, v, mask=mask)
            store_copy(out_ptr, offsets, p, mask, OUT_MODE)
        if ZERO_GRAD:
            tl.store(grad_ptr + offsets, tl.zeros([BLOCK], grad_ptr.dtype.element_ty), mask=mask)


def adam_step_triton(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    out: torch.Tensor | None,
    hp: AdamHyperparams,
    grad_scale: torch.Tensor | None = None,
    zero_grad: bool = False,
    found_inf: torch.Tensor | None = None,
) -> None:
    """The fused step as one Triton launch. See `adam_step` for the arguments."""
    if triton is None:
        raise RuntimeError("Triton is not installed; use adam_step_reference")
    n = param.numel()
    for name, tensor in (("grad", grad), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq), ("out", out)):
        if tensor is not None and (tensor.numel() != n or not tensor.is_contiguous()):
            raise ValueError(f"adam_step: {name} must be contiguous with {n} elements like param")
    if param.dtype != torch.float32 or exp_avg.dtype != torch.float32 or exp_avg_sq.dtype != torch.float32:
        raise ValueError("adam_step: param, exp_avg and exp_avg_sq must be float32")
    if n == 0:
        return
    _adam_kernel[(triton.cdiv(n, BLOCK_SIZE),)](
        param, grad, exp_avg, exp_avg_sq,
        out if out is not None else param,
        grad_scale if grad_scale is not None else param,
        found_inf if found_inf is not None else param,
        n, hp.lr, hp.beta1, hp.beta2, hp.eps, hp.weight_decay, hp.step_size, hp.bias_correction2_sqrt,
        DECOUPLED=hp.decoupled, HAS_SCALE=grad_scale is not None, HAS_SKIP=found_inf is not None,
        OUT_MODE=out_mode(out), ZERO_GRAD=zero_grad,
        BLOCK=BLOCK_SIZE, num_warps=8,
    )  # fmt: skip


def adam_step(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    out: torch.Tensor | None,
    hp: AdamHyperparams,
    grad_scale: torch.Tensor | None = None,
    zero_grad: bool = False,
    found_inf: torch.Tensor | None = None,
) -> None:
    """One Adam/AdamW step over flat tensors, in place: Triton on CUDA; on the CPU (optimizer
    offload's host update) torch's fused CPU Adam/AdamW.

    Args:
        param: fp32 master weights (updated).
        grad: the gradient, fp32 or 16-bit (zeroed afterwards when `zero_grad`).
        exp_avg, exp_avg_sq: fp32 moments (updated).
        out: where to write the updated weights in the compute dtype, or None.
        hp: learning rate, betas, eps, weight decay, step number, decoupled or L2 decay.
        grad_scale: a one-element device tensor multiplied into the gradient first, or None.
        zero_grad: reset `grad` to zero on the way (also when the step is skipped).
        found_inf: a one-element device tensor; nonzero skips the update (fp16 overflow), or None.
    """
    if param.is_cuda and triton is not None:
        step = adam_step_triton
    elif _torch_cpu_fused_applies(param, grad_scale):
        step = adam_step_torch_cpu
    else:
        step = adam_step_reference
    step(param, grad, exp_avg, exp_avg_sq, out, hp, grad_scale, zero_grad, found_inf)


def _torch_cpu_fused_applies(param: torch.Tensor, grad_scale: torch.Tensor | None) -> bool:
    on_cpu = param.device.type == "cpu" and (grad_scale is None or grad_scale.device.type == "cpu")
    return on_cpu and param.dtype == torch.float32 and hasattr(torch, "_fused_adamw_")


def adam_step_torch_cpu(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    out: torch.Tensor | None,
    hp: AdamHyperparams,
    grad_scale: torch.Tensor | None = None,
    zero_grad: bool = False,
    found_inf: torch.Tensor | None = None,
) -> None:
    """The step through torch's fused CPU Adam/AdamW (one vectorised, multi-threaded pass, several
    times faster than the reference's separate operations), for fp32 CPU masters. It divides the
    gradient by its `grad_scale`, so it gets ours inverted, and leaves the quotient in an fp32
    gradient (the engine's gradients are cleared after the step anyway); a 16-bit gradient is
    widened into a temporary first."""
    if skipped_on_host(grad, zero_grad, found_inf):
        return
    fused = torch._fused_adamw_ if hp.decoupled else torch._fused_adam_
    fused(
        [param], [grad if grad.dtype == torch.float32 else grad.float()], [exp_avg], [exp_avg_sq], [],
        [torch.tensor(float(hp.step))],
        lr=hp.lr, beta1=hp.beta1, beta2=hp.beta2, weight_decay=hp.weight_decay, eps=hp.eps,
        amsgrad=False, maximize=False,
        grad_scale=None if grad_scale is None else grad_scale.reciprocal().float().reshape(()),
        found_inf=None,
    )  # fmt: skip
    if out is not None:
        out.copy_(param)
    if zero_grad:
        grad.zero_()
