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

from collections.abc import Callable, Iterable, Sequence

import torch

from ..core.arena import carve, merge_adjacent
from ..core.chained_optimizer import owner_of_group
from ..kernels.adamw import AdamHyperparams, adam_step
from ..kernels.sgd import SGDHyperparams, sgd_step

# (start, length, gradient, where the 16-bit copy goes): one contiguous piece of a master shard.
Piece = tuple[int, int, torch.Tensor, torch.Tensor | None]
# A master shard and the pieces that cover it: a list, or a generator whose pieces are valid only
# until it moves on (host staging's double buffers).
Part = tuple[torch.Tensor, Iterable[Piece]]

_ADAM_CLASSES = (torch.optim.Adam, torch.optim.AdamW)


def _is_host_number(value) -> bool:
    return not torch.is_tensor(value) or (value.device.type == "cpu" and value.numel() == 1)


def supports_fused_step(optimizer: torch.optim.Optimizer, group: dict) -> bool:
    """Whether this param group's update is one a fused kernel computes exactly."""
    optimizer = owner_of_group(optimizer, group)
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
    parts: Sequence[Part],
    grad_scale: torch.Tensor | None,
    zero_grad: bool,
    found_inf: torch.Tensor | None = None,
) -> Callable[[], None]:
    """One step of the masters in `parts` (parameters of the param group `group`) with the fused
    kernel for its optimizer.

    Each part is a master and its pieces, which cover it: the gradient of `master[start:start +
    length]` and where to write the updated weights in the compute dtype (None: nowhere). The step
    is elementwise, so pieces that sit end to end in every tensor they touch (the segments of one
    param group, carved from one arena each: `arena.py`) are merged into one launch. State is made
    as torch makes it, each kind carved from one allocation for all the masters that lack it, and
    state that a load left in separate tensors is packed again the same way. Returns the undo of
    the host-side bookkeeping, for a step `found_inf` turns out to have skipped.
    """
    step = _adam if type(owner_of_group(optimizer, group)) in _ADAM_CLASSES else _sgd
    return step(optimizer, group, parts, grad_scale, zero_grad, found_inf)


def _ensure_state(optimizer, masters: list[torch.Tensor], keys: tuple[str, ...], with_step: bool) -> list:
    """Give each master lacking state zeroed `keys` tensors like it (and a host step count), carved
    from one allocation per key; pack the masters' existing `keys` tensors end to end where the
    masters are and they are not. Returns the masters whose state was made here."""
    created = [m for m in masters if not optimizer.state.get(m)]
    if created:
        carved = {key: _carve_like(created) for key in keys}
        for index, master in enumerate(created):
            state = optimizer.state[master]
            if with_step:
                # As torch creates it; the step count lives on the host so reading it never syncs.
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
            for key in keys:
                state[key] = carved[key][index]
    if len(masters) > 1 and len(merge_adjacent([(m.data,) for m in masters])) == 1:
        for key in keys:
            values = [optimizer.state[m].get(key) for m in masters]
            if all(torch.is_tensor(v) for v in values) and len(merge_adjacent([(v,) for v in values])) > 1:
                for master, view in zip(masters, _carve_like(masters), strict=True):
                    view.copy_(optimizer.state[master][key])
                    optimizer.state[master][key] = view
    return created


def _carve_like(masters: list[torch.Tensor]) -> list[torch.Tensor]:
    return carve([m.numel() for m in masters], torch.float32, masters[0].device)


def _launch_rows(parts: Sequence[Part], row_of: Callable, launch: Callable) -> None:
    """Launch the kernel over every piece: `row_of(master, piece)` gives its (hyper-parameter key,
    row of tensors), `launch(key, row)` runs it. Pieces given as lists are merged where they sit
    end to end (`merge_adjacent`) and launched last; a generator's pieces (host staging) are
    launched as they come, since each is only valid until the generator moves on."""
    batches: dict = {}
    for master, pieces in parts:
        for piece in pieces:
            key, row = row_of(master, piece)
            if isinstance(pieces, list):
                batches.setdefault(key, []).append(row)
            else:
                launch(key, row)
    for key, rows in batches.items():
        for row in merge_adjacent(rows):
            launch(key, row)


def _adam(optimizer, group, parts, grad_scale, zero_grad, found_inf) -> Callable[[], None]:
    masters = [master for master, _ in parts]
    created = _ensure_state(optimizer, masters, ("exp_avg", "exp_avg_sq"), with_step=True)
    steps = {}
    for master in masters:
        state = optimizer.state[master]
        if state["step"].device.type != "cpu":
            state["step"] = state["step"].to("cpu", torch.float32)
        state["step"] += 1
        steps[id(master)] = int(state["step"].item())
    beta1, beta2 = group["betas"]
    decoupled = group.get("decoupled_weight_decay", isinstance(optimizer, torch.optim.AdamW))

    def row_of(master, piece):
        start, length, grad, out = piece
        state, end = optimizer.state[master], start + length
        return steps[id(master)], (
            master.data[start:end], grad, state["exp_avg"][start:end], state["exp_avg_sq"][start:end], out,
        )  # fmt: skip

    def launch(step, row):
        hyperparams = AdamHyperparams(
            lr=float(group["lr"]),
            beta1=float(beta1),
            beta2=float(beta2),
            eps=float(group["eps"]),
            weight_decay=float(group["weight_decay"]),
            step=step,
            decoupled=bool(decoupled),
        )
        adam_step(*row, hyperparams, grad_scale, zero_grad, found_inf)

    _launch_rows(parts, row_of, launch)
    made = {id(master) for master in created}

    def undo() -> None:
        for master in masters:
            if id(master) in made:
                del optimizer.state[master]
            else:
                optimizer.state[master]["step"] -= 1

    return undo


def _sgd(optimizer, group, parts, grad_scale, zero_grad, found_inf) -> Callable[[], None]:
    momentum = float(group["momentum"])
    masters = [master for master, _ in parts]
    created = []
    if momentum != 0:  # as torch's SGD, which keeps no state without momentum
        created = _ensure_state(optimizer, masters, ("momentum_buffer",), with_step=False)
    made = {id(master) for master in created}

    def row_of(master, piece):
        start, length, grad, out = piece
        end = start + length
        buffer = optimizer.state[master]["momentum_buffer"][start:end] if momentum != 0 else None
        return id(master) in made, (master.data[start:end], grad, buffer, out)

    def launch(first, row):
        hyperparams = SGDHyperparams(
            lr=float(group["lr"]),
            momentum=momentum,
            dampening=float(group["dampening"]),
            weight_decay=float(group["weight_decay"]),
            nesterov=bool(group["nesterov"]),
            first=first,
        )
        sgd_step(*row, hyperparams, grad_scale, zero_grad, found_inf)

    _launch_rows(parts, row_of, launch)

    def undo() -> None:
        for master in created:
            del optimizer.state[master]

    return undo
