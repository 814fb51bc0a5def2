"""Step Adam/AdamW and SGD param groups with hf_zero's fused kernels (`hf_zero.kernels`) instead of
torch's own update, keeping the optimizer's state in torch's format.

The optimizer keeps its state dict, hyper-parameters and LR schedule: the kernels read the group's
hyper-parameters and update the group's state (`exp_avg`, `exp_avg_sq`, `step`;
`momentum_buffer`) in place. Variants the kernels do not implement (amsgrad, maximize,
capturable, differentiable, tensor hyper-parameters on a device) stay on torch's path.

Each step returns an `undo` for its bookkeeping: the kernels leave weights and moments untouched
when the device flag says the step overflowed, but the host advanced the step count (and may have
created state) before anyone knew; the engine calls `undo` once it reads the flag.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .kernels.adamw import AdamHyperparams, adam_step
from .kernels.sgd import SGDHyperparams, sgd_step

# (start, length, gradient, where the 16-bit copy goes): one contiguous piece of a master shard.
Piece = tuple[int, int, torch.Tensor, torch.Tensor | None]

_ADAM_CLASSES = (torch.optim.Adam, torch.optim.AdamW)


def _is_host_number(value) -> bool:
    return not torch.is_tensor(value) or (value.device.type == "cpu" and value.numel() == 1)


def supports_fused_step(optimizer: torch.optim.Optimizer, group: dict) -> bool:
    """Whether this param group's update is one a fused kernel computes exactly."""
    if group.get("maximize") or group.get("differentiable"):
        return False
    if type(optimizer) in _ADAM_CLASSES:
        if group.get("amsgrad") or group.get("capturable"):
            return False
        scalars = [group["lr"], *group["betas"], group["eps"], group["weight_decay"]]
    elif type(optimizer) is torch.optim.SGD:
        scalars = [group["lr"], group["momentum"], group["dampening"], group["weight_decay"]]
    else:
        return False
    return all(_is_host_number(value) for value in scalars)


def fused_step(
    optimizer: torch.optim.Optimizer,
    group: dict,
    master: torch.Tensor,
    pieces: list[Piece],
    grad_scale: torch.Tensor | None,
    zero_grad: bool,
    found_inf: torch.Tensor | None = None,
) -> Callable[[], None]:
    """One step of `master` (the group's only parameter) with the fused kernel for its optimizer.

    `pieces` cover the shard: the gradient of `master[start:start + length]` and where to write
    the updated weights in the compute dtype (None: nowhere). The step is elementwise, so one
    launch per piece is the same update as one launch over the whole shard. Returns the undo of
    the host-side bookkeeping, for a step `found_inf` turns out to have skipped.
    """
    step = _adam if type(optimizer) in _ADAM_CLASSES else _sgd
    return step(optimizer, group, master, pieces, grad_scale, zero_grad, found_inf)


def _adam(optimizer, group, master, pieces, grad_scale, zero_grad, found_inf) -> Callable[[], None]:
    state = optimizer.state[master]
    created = not state
    if created:
        # As torch creates it; the step count lives on the host so reading it never syncs.
        state["step"] = torch.tensor(0.0, dtype=torch.float32)
        state["exp_avg"] = torch.zeros_like(master, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(master, memory_format=torch.preserve_format)
    elif state["step"].device.type != "cpu":
        state["step"] = state["step"].to("cpu", torch.float32)
    state["step"] += 1
    beta1, beta2 = group["betas"]
    decoupled = group.get("decoupled_weight_decay", isinstance(optimizer, torch.optim.AdamW))
    hyperparams = AdamHyperparams(
        lr=float(group["lr"]),
        beta1=float(beta1),
        beta2=float(beta2),
        eps=float(group["eps"]),
        weight_decay=float(group["weight_decay"]),
        step=int(state["step"].item()),
        decoupled=bool(decoupled),
    )
    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
    for start, length, grad, out in pieces:
        end = start + length
        adam_step(
            master.data[start:end], grad, exp_avg[start:end], exp_avg_sq[start:end], out,
            hyperparams, grad_scale, zero_grad, found_inf,
        )  # fmt: skip

    def undo() -> None:
        if created:
            del optimizer.state[master]
        else:
            state["step"] -= 1

    return undo


def _sgd(optimizer, group, master, pieces, grad_scale, zero_grad, found_inf) -> Callable[[], None]:
    momentum = float(group["momentum"])
    buffer, created = None, False
    if momentum != 0:  # as torch's SGD, which keeps no state without momentum
        state = optimizer.state[master]
        buffer = state.get("momentum_buffer")
        created = buffer is None
        if created:
            buffer = state["momentum_buffer"] = torch.empty_like(master, memory_format=torch.preserve_format)
    hyperparams = SGDHyperparams(
        lr=float(group["lr"]),
        momentum=momentum,
        dampening=float(group["dampening"]),
        weight_decay=float(group["weight_decay"]),
        nesterov=bool(group["nesterov"]),
        first=created,
    )
    for start, length, grad, out in pieces:
        end = start + length
        sgd_step(
            master.data[start:end], grad, None if buffer is None else buffer[start:end], out,
            hyperparams, grad_scale, zero_grad, found_inf,
        )  # fmt: skip

    def undo() -> None:
        if created:
            del optimizer.state[master]

    return undo
