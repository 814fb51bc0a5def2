"""Step Adam/AdamW param groups with the fused kernel (`hf_zero.kernels.adam_step`) instead of
torch's own update, keeping the optimizer's state in torch's format.

The optimizer keeps its state dict, hyper-parameters and LR schedule: the kernel reads the
group's `lr`, `betas`, `eps` and `weight_decay` and updates the group's `exp_avg`, `exp_avg_sq`
and `step` in place. Variants the kernel does not implement (amsgrad, maximize, capturable,
differentiable, tensor hyper-parameters on a device) stay on torch's path.
"""

from __future__ import annotations

import torch

from .kernels import AdamHyperparams, adam_step

_ADAM_CLASSES = (torch.optim.Adam, torch.optim.AdamW)


def _is_host_number(value) -> bool:
    return not torch.is_tensor(value) or (value.device.type == "cpu" and value.numel() == 1)


def supports_fused_adam(optimizer: torch.optim.Optimizer, group: dict) -> bool:
    """Whether this param group's update is one the fused kernel computes exactly."""
    if type(optimizer) not in _ADAM_CLASSES:
        return False
    if (
        group.get("amsgrad")
        or group.get("maximize")
        or group.get("capturable")
        or group.get("differentiable")
    ):
        return False
    scalars = [group["lr"], *group["betas"], group["eps"], group["weight_decay"]]
    return all(_is_host_number(value) for value in scalars)


def fused_adam_step(
    optimizer: torch.optim.Optimizer,
    group: dict,
    master: torch.Tensor,
    pieces: list[tuple[int, int, torch.Tensor, torch.Tensor | None]],
    grad_scale: torch.Tensor | None,
    zero_grad: bool,
) -> None:
    """One Adam/AdamW step of `master` (the group's only parameter) with the fused kernel.

    `pieces` cover the shard as `(start, length, grad, out)`: the gradient of
    `master[start:start + length]` and where to write the updated weights in the compute dtype
    (None: nowhere). The step is elementwise, so one launch per piece is the same update as one
    launch over the whole shard; the step count advances once.
    """
    state = optimizer.state[master]
    if not state:
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
            hyperparams, grad_scale, zero_grad,
        )  # fmt: skip
