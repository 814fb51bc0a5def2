"""Turn the user's optimizer into an optimizer over this rank's flat master shards, in place.

The optimizer object the user built keeps its identity, class, param groups and
hyper-parameters (so an LR scheduler made before `hf_zero.initialize` still drives it); only each
group's `params` list is swapped for one flat fp32 master shard, and any per-parameter state it
already holds is re-laid onto that shard. This is exact for elementwise optimizers, whose update
of one element depends on that element alone. Two kinds of optimizer that are not elementwise
run at the owner of each whole parameter instead: torch's Muon, whose only non-elementwise part
(Newton–Schulz) `matrix_step.py` runs there, and those that need each whole tensor (Adafactor,
and the classes `ZeroConfig.whole_parameter_optimizers` names), which `whole_step.py` steps
there. Others are refused with a clear error. Several optimizers chained into one
(`ChainedOptimizer`, from a list such as `[muon, adamw]`) are checked one by one.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch

from ..core.chained_optimizer import chained_optimizers
from ..core.layout import FlatLayout
from .matrix_step import is_muon
from .whole_step import WHOLE_PARAMETER_OPTIMIZERS

ELEMENTWISE_OPTIMIZERS: tuple[type[torch.optim.Optimizer], ...] = (
    torch.optim.SGD,
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.Adamax,
    torch.optim.NAdam,
    torch.optim.RAdam,
    torch.optim.RMSprop,
    torch.optim.Adagrad,
    torch.optim.Adadelta,
    torch.optim.Rprop,
    torch.optim.ASGD,
)

# Optimizers whose update mixes elements of a tensor (norms, factored moments, line searches).
_NEVER_SHARDED = {
    "LBFGS": "it runs a line search over the whole parameter vector with a closure",
    "SparseAdam": "it updates sparse gradients row by row",
}
_NON_ELEMENTWISE_REASONS = {
    **_NEVER_SHARDED,
    "Adafactor": "it factors second moments over rows and columns of each matrix",
    "Lamb": "it scales each tensor's update by a per-tensor trust ratio",
    "LAMB": "it scales each tensor's update by a per-tensor trust ratio",
    "FusedLamb": "it scales each tensor's update by a per-tensor trust ratio",
    "LARS": "it scales each tensor's update by a per-tensor trust ratio",
    "Shampoo": "it preconditions with per-matrix statistics",
}


def check_optimizers(
    optimizer: torch.optim.Optimizer, allow_untested: bool, whole: Sequence[str] = ()
) -> None:
    """Refuse what the engine cannot shard exactly: each chained optimizer must be elementwise,
    torch's Muon, or stepped by whole parameter (`is_whole_parameter`; see `check_elementwise`)."""
    for child in chained_optimizers(optimizer):
        if not is_muon(child) and not is_whole_parameter(child, whole):
            check_elementwise(child, allow_untested)


def is_whole_parameter(optimizer: torch.optim.Optimizer, names: Sequence[str]) -> bool:
    """Whether hf_zero steps `optimizer`'s parameters whole at their owners (`whole_step.py`): torch's
    Adafactor, and the classes `ZeroConfig.whole_parameter_optimizers` names."""
    cls = type(optimizer)
    if cls.__name__ in _NEVER_SHARDED:
        return False
    return cls in WHOLE_PARAMETER_OPTIMIZERS or bool(
        {cls.__name__, f"{cls.__module__}.{cls.__qualname__}"} & set(names)
    )


def check_elementwise(optimizer: torch.optim.Optimizer, allow_untested: bool) -> None:
    """Refuse optimizers whose update is not elementwise, and unknown ones unless allowed."""
    cls = type(optimizer)
    reason = _NON_ELEMENTWISE_REASONS.get(cls.__name__)
    if reason is not None:
        whole = (
            ""
            if cls.__name__ in _NEVER_SHARDED
            else f" To step each parameter whole at one rank, add {cls.__name__!r} to "
            "ZeroConfig.whole_parameter_optimizers."
        )
        raise ValueError(
            f"{cls.__name__} cannot run on hf_zero's flat shards: {reason}, and each rank holds only a "
            "slice of every tensor. Use an elementwise optimizer such as torch.optim.AdamW, Adam, SGD, "
            "RMSprop or Adagrad, or torch.optim.Muon for the hidden matrices (with AdamW for the rest: "
            f"hf_zero.initialize(model, [muon, adamw], config)).{whole}"
        )
    if cls in ELEMENTWISE_OPTIMIZERS or allow_untested:
        return
    known = ", ".join(c.__name__ for c in ELEMENTWISE_OPTIMIZERS)
    raise ValueError(
        f"hf_zero does not know whether {cls.__module__}.{cls.__name__} is elementwise (the update of "
        f"each element depends on that element only), which sharding into flat slices requires. Known "
        f"elementwise optimizers: {known}. If yours is elementwise, set allow_untested_optimizer=True "
        "in the ZeroConfig; if its update of a tensor needs the whole tensor (norms, factored moments), "
        f"add {cls.__name__!r} to ZeroConfig.whole_parameter_optimizers."
    )


def shard_param_state(
    per_param: Sequence[dict],
    params: Sequence[torch.Tensor],
    layout: FlatLayout,
    rank: int,
    device: torch.device,
) -> dict:
    """Re-lay per-parameter optimizer state onto one flat shard.

    Tensors shaped like their parameter are flattened and sharded like the parameters; scalars
    (such as Adam's `step`) must agree across the group and are kept once.
    """
    populated = [state for state in per_param if state]
    if not populated:
        return {}
    keys = set(populated[0])
    if len(populated) != len(per_param) or any(set(state) != keys for state in populated):
        raise ValueError(
            "the optimizer holds state for only some parameters of a param group; hf_zero needs all "
            "or none of them to have state. Call hf_zero.initialize before the first optimizer step."
        )
    sharded = {}
    for key in sorted(keys):
        values = [state[key] for state in per_param]
        first = values[0]
        if (
            all(torch.is_tensor(v) and v.shape == p.shape for v, p in zip(values, params, strict=True))
            and first.dim() > 0
        ):
            sharded[key] = layout.shard_of(values, rank, torch.float32, device)
        elif all(_same_scalar(v, first) for v in values):
            sharded[key] = first.clone() if torch.is_tensor(first) else first
        else:
            raise ValueError(
                f"optimizer state {key!r} is neither shaped like its parameters nor the same scalar for "
                "every parameter of the group, so it cannot be sharded"
            )
    return sharded


def _same_scalar(value, first) -> bool:
    if torch.is_tensor(value) and torch.is_tensor(first):
        return value.numel() == 1 and first.numel() == 1 and bool(value.item() == first.item())
    return not torch.is_tensor(value) and not torch.is_tensor(first) and value == first


def rebind_to_shards(optimizer: torch.optim.Optimizer, segments: Sequence) -> None:
    """Point each param group at the master shards of its segments and move existing state onto them.

    A segment (a `FlatParamGroup`) holds the parameters of one param group that compute in one
    dtype; each param group ends up with one master shard per segment, usually exactly one. A
    group built from `named_parameters()` gets one name per shard.
    """
    new_state: dict = defaultdict(dict)
    masters_of: list[list[torch.Tensor]] = [[] for _ in optimizer.param_groups]
    for segment in segments:
        states = [optimizer.state.get(p, {}) for p in segment.params]
        shard_state = shard_param_state(
            states, segment.params, segment.layout, segment.rank, segment.master.device
        )
        if shard_state:
            new_state[segment.master] = shard_state
        masters_of[segment.optimizer_group].append(segment.master)
    for index, (group, masters) in enumerate(zip(optimizer.param_groups, masters_of, strict=True)):
        group["params"] = masters
        if "param_names" in group:
            group["param_names"] = [f"hf_zero.shard.group{index}.{k}" for k in range(len(masters))]
    optimizer.state = new_state
