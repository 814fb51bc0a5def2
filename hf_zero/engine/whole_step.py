"""Optimizers whose update of a tensor needs the whole tensor (Adafactor's factored second moments,
LAMB's trust ratio, ...), stepped whole at one owner per parameter.

Each step, one all-to-all brings every owner the whole fp32 gradient of each parameter it owns and
a second the whole fp32 master; the owner runs the user's own optimizer class (one instance per
param group, built from the group's own hyper-parameters each step, so LR schedulers keep driving
it) on those whole tensors, and a third all-to-all returns each rank its pieces of the new master.
The optimizer state lives whole at the owner (memory about 1/N of it per rank, owners balanced by
size), and a checkpoint records it with the tensor it belongs to, so a run resumes on any number
of ranks: the new owner reads it (`checkpoint/save.py`, `checkpoint/load.py`).

Muon, whose only non-elementwise part is Newton–Schulz, takes the lighter path of `matrix_step.py`.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch

from ..core.chained_optimizer import owner_of_group
from ..core.distributed import Collectives
from ..core.flat_group import FlatParamGroup
from ..core.owners import OwnerPlan

# Torch's optimizers whose update needs each whole tensor, stepped here unless the user says otherwise.
WHOLE_PARAMETER_OPTIMIZERS = tuple(
    cls for cls in (getattr(torch.optim, "Adafactor", None),) if cls is not None
)
_BOOKKEEPING = ("params", "param_names")


def _constructor_defaults(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's defaults its constructor takes (torch adds bookkeeping flags to `defaults`
    after a `load_state_dict`, such as `differentiable`, that some constructors do not accept)."""
    accepted = inspect.signature(type(optimizer).__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values()):
        return dict(optimizer.defaults)
    return {key: value for key, value in optimizer.defaults.items() if key in accepted}


def _numel(shape: torch.Size) -> int:
    return int(torch.Size(shape).numel())


class WholeParameterStep(OwnerPlan):
    """The update of segments whose param groups belong to a whole-parameter optimizer."""

    def __init__(self, segments: Mapping[int, FlatParamGroup], comm: Collectives) -> None:
        super().__init__(segments, comm, cost=_numel)
        # Owned parameter -> its optimizer state, whole, kept between steps (and set by a load).
        self.states: dict[int, dict[str, Any]] = {}

    def step(
        self, optimizer: torch.optim.Optimizer, groups: Mapping[int, dict], grads: Mapping[int, torch.Tensor]
    ) -> None:
        """Update every segment's master with the optimizer its param group belongs to (in a chain,
        one of the chained); `grads[g]` is segment g's reduced, unscaled and clipped gradient shard
        in fp32, `groups[g]` its param group."""
        whole_grads = self.to_owners(grads, torch.float32)
        params = self.to_owners({g: s.master.data for g, s in self.segments.items()}, torch.float32)
        by_group: dict[int, list[int]] = {}
        for k in self.owned:
            by_group.setdefault(self.segments[self.matrices[k][0]].optimizer_group, []).append(k)
        for owned in by_group.values():
            g = self.matrices[owned[0]][0]
            group = groups[g]
            tensors = [params[k] for k in owned]
            for k, tensor in zip(owned, tensors, strict=True):
                tensor.grad = whole_grads[k]
            user = owner_of_group(optimizer, group)
            # The user's class on the whole tensors, with the group's hyper-parameters as they are now.
            stepper = type(user)(tensors, **_constructor_defaults(user))
            stepper.param_groups[0].update({key: v for key, v in group.items() if key not in _BOOKKEEPING})
            for k, tensor in zip(owned, tensors, strict=True):
                if k in self.states:
                    stepper.state[tensor] = self.states[k]
            stepper.step()
            for k, tensor in zip(owned, tensors, strict=True):
                self.states[k] = stepper.state[tensor]
                tensor.grad = None
        for p, values in self.from_owners(params, torch.float32):
            self.segments[p.segment].master.data[p.shard_begin : p.shard_begin + p.length].copy_(values)

    def state_of(self, g: int, slot: int) -> dict[str, Any] | None:
        """The optimizer state of segment g's parameter `slot`, where this rank owns it (else None)."""
        k = self.index[(g, slot)]
        return self.states.get(k) if self.owners[k] == self.rank else None

    def owner_of(self, g: int, slot: int) -> int:
        return self.owners[self.index[(g, slot)]]

    def set_state(self, g: int, slot: int, state: dict[str, Any]) -> None:
        """Give the owned parameter `slot` of segment g its optimizer state (a checkpoint's)."""
        self.states[self.index[(g, slot)]] = state

    def state_bytes(self) -> int:
        """Bytes of the optimizer state this rank keeps for the parameters it owns."""
        return sum(
            value.numel() * value.element_size()
            for state in self.states.values()
            for value in state.values()
            if torch.is_tensor(value) and value.dim() > 0
        )
