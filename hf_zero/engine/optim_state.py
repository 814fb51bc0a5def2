"""Load an unsharded optimizer's state dict (such as a plain Trainer's `optimizer.pt`) into an engine.

`torch.optim.Optimizer.state_dict()` numbers tensors by position, counting across param groups
in order and including every tensor a group held, frozen ones too. The engine remembers which
model parameter each position was (`engine.source_param_names`), so every rank can cut its own
slice of each per-parameter tensor out of the full state, as `hf_zero.initialize` does with state
an optimizer already holds. Nothing is exchanged between ranks: each reads the same state dict.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..core.layout import ParamSlot
from .optim import shard_param_state
from .zero_engine import ZeroEngine

# Keys of a saved param group that are bookkeeping rather than hyper-parameters.
_GROUP_BOOKKEEPING = ("params", "param_names")


def load_unsharded_optimizer_state(engine: ZeroEngine, state_dict: Mapping[str, Any]) -> None:
    """Give `engine.optimizer` this rank's share of an unsharded optimizer state dict.

    `state_dict` is what `state_dict()` returned for an optimizer of the same kind built over the
    same model with the same param groups (for instance the `optimizer.pt` of a checkpoint written
    by `transformers.Trainer` without hf_zero). The number of groups, their sizes, their parameter
    names (where the state dict records them), the hyper-parameters each group names and the
    shape of every per-parameter tensor are checked first; nothing changes if a check fails. The
    groups' hyper-parameter values are then loaded as `torch.optim.Optimizer.load_state_dict`
    loads them (the saved values replace the current ones, `lr` included), so load the LR
    scheduler's state as well where there is one.
    """
    engine.finish_delayed_update()  # the update in flight would write the state replaced here
    saved_groups = state_dict["param_groups"]
    saved_state = state_dict["state"]
    _check_groups(engine, saved_groups)
    sharded_state: dict[int, dict] = {}
    param_groups = []
    position = 0  # the engine optimizer's own numbering: its master shards, group after group
    for index, (names, saved) in enumerate(zip(engine.source_param_names, saved_groups, strict=True)):
        position_of = dict(zip(names, saved["params"], strict=True))
        positions = []
        # A param group owns one master shard per segment (one per unit, plus fp32 ones for
        # parameters kept in fp32), in the order the engine built them. All or none of the group's
        # parameters have state, whichever segment they are in.
        segments = [g for g in engine.groups if g.optimizer_group == index]
        states = [[saved_state.get(position_of[slot.name], {}) for slot in g.layout.slots] for g in segments]
        _check_param_states(
            index, [slot for g in segments for slot in g.layout.slots], [s for per in states for s in per]
        )
        for segment, per_param in zip(segments, states, strict=True):
            shard = shard_param_state(
                per_param, segment.params, segment.layout, segment.rank, segment.master.device
            )
            if shard:
                sharded_state[position] = shard
            positions.append(position)
            position += 1
        hyperparameters = {key: value for key, value in saved.items() if key not in _GROUP_BOOKKEEPING}
        param_groups.append({**hyperparameters, "params": positions})
    # Each group of the engine's optimizer holds its flat master shards: hand torch a state dict in
    # that shape and let it load hyper-parameters and cast state exactly as it always does.
    engine.optimizer.load_state_dict({"state": sharded_state, "param_groups": param_groups})


def _check_groups(engine: ZeroEngine, saved_groups: Sequence[Mapping[str, Any]]) -> None:
    """Refuse a state dict whose param groups are not the ones the engine's optimizer was built with."""
    expected_sizes = [len(names) for names in engine.source_param_names]
    saved_sizes = [len(group["params"]) for group in saved_groups]
    if saved_sizes != expected_sizes:
        raise ValueError(
            f"the optimizer state holds {len(saved_sizes)} param group(s) of sizes {saved_sizes}, but the "
            f"optimizer was built with {len(expected_sizes)} of sizes {expected_sizes}: it was saved for a "
            "different model or a different grouping of its parameters (weight decay, frozen layers); "
            "build the optimizer the way the checkpointed run did"
        )
    required = _required_hyperparameters(engine.optimizer)
    for index, (names, saved) in enumerate(zip(engine.source_param_names, saved_groups, strict=True)):
        saved_names = saved.get("param_names")
        if saved_names is not None and list(saved_names) != list(names):
            mismatch = next(
                (pair for pair in zip(saved_names, names, strict=True) if pair[0] != pair[1]), None
            )
            raise ValueError(
                f"param group {index} of the optimizer state names its parameters differently from this "
                f"model (first difference: saved {mismatch[0]!r}, model {mismatch[1]!r}); it was saved for "
                "a different model"
            )
        missing = sorted(required - set(saved))
        if missing:
            raise ValueError(
                f"param group {index} of the optimizer state has no {missing}, which "
                f"{type(engine.optimizer).__name__} needs: it was saved by a different kind of optimizer; "
                "resume with the optimizer the checkpointed run used"
            )


def _required_hyperparameters(optimizer: torch.optim.Optimizer) -> set[str]:
    """The optimizer's numeric hyper-parameters (lr, betas, momentum...), which any state dict it wrote has.

    Flags (booleans and None, such as `foreach` or `decoupled_weight_decay`) are left out: torch
    adds new ones over releases and fills them in when loading an older state dict.
    """
    return {
        key for key, value in optimizer.defaults.items() if value is not None and not isinstance(value, bool)
    }


def _check_param_states(group_index: int, slots: Sequence[ParamSlot], per_param: Sequence[Mapping]) -> None:
    """Every trainable parameter of a group has state, or none does; each tensor fits its parameter."""
    without = [slot.name for slot, state in zip(slots, per_param, strict=True) if not state]
    if without and len(without) != len(per_param):
        raise ValueError(
            f"the optimizer state holds nothing for {without[:5]} in param group {group_index} but does for "
            "other parameters of the group: these parameters were frozen (or absent) when it was saved; "
            "resume with the same trainable parameters as the checkpointed run"
        )
    for slot, state in zip(slots, per_param, strict=True):
        for key, value in state.items():
            if torch.is_tensor(value) and value.dim() > 0 and tuple(value.shape) != tuple(slot.shape):
                raise ValueError(
                    f"the optimizer state's {key!r} for parameter {slot.name} has shape "
                    f"{tuple(value.shape)} but the parameter has shape {tuple(slot.shape)}: it was saved "
                    "for a different model"
                )
