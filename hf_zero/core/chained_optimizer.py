"""Several torch optimizers over disjoint parameters, stepped as one: Muon for the hidden matrices
and AdamW for the rest, as Muon is used.

`ChainedOptimizer([muon, adamw])` is itself a `torch.optim.Optimizer`: its `param_groups` are the
very group dicts of the optimizers it chains, in order (so an LR scheduler built on any of them,
or on the chain, drives the same numbers), its `state` is one dict that every chained optimizer
shares (their parameters are disjoint), and its `step()` steps each in turn. `hf_zero.initialize`
and `ZeroTrainer` accept a list of optimizers and chain them so; the engine then treats the chain
as one optimizer with all their param groups, and knows by each group which optimizer it belongs
to (`owner_of_group`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch


class ChainedOptimizer(torch.optim.Optimizer):
    """The optimizers in `optimizers` as one: their param groups in order, one shared state dict,
    and a `step()` that steps each of them.

    Each tensor may belong to one of them only. The chained optimizers stay usable by themselves
    (their own `step()` steps only themselves), but under hf_zero every one's `step()` and
    `zero_grad()` act for the whole chain, as the engine updates all parameters in one step.
    """

    def __init__(self, optimizers: Iterable[torch.optim.Optimizer]) -> None:
        chained: list[torch.optim.Optimizer] = []
        for optimizer in optimizers:
            # A chain inside a chain is flattened: the engine sees plain optimizers only.
            chained.extend(optimizer.optimizers if isinstance(optimizer, ChainedOptimizer) else [optimizer])
        if not chained:
            raise ValueError("ChainedOptimizer needs at least one optimizer")
        for optimizer in chained:
            if not isinstance(optimizer, torch.optim.Optimizer):
                raise TypeError(
                    f"ChainedOptimizer chains torch.optim.Optimizer objects, not {type(optimizer).__name__}"
                )
        seen: dict[int, int] = {}
        for index, optimizer in enumerate(chained):
            for group in optimizer.param_groups:
                for param in group["params"]:
                    if seen.setdefault(id(param), index) != index:
                        raise ValueError(
                            f"a parameter of shape {tuple(param.shape)} is in optimizer {seen[id(param)]} "
                            f"({type(chained[seen[id(param)]]).__name__}) and in optimizer {index} "
                            f"({type(optimizer).__name__}) of the chain; give each parameter to one optimizer"
                        )
        self.optimizers = chained
        merged: dict = {}
        for optimizer in chained:
            merged.update(optimizer.state)
        params = [p for optimizer in chained for group in optimizer.param_groups for p in group["params"]]
        # torch's constructor sets up hooks and bookkeeping; the groups it builds are replaced by
        # the chained optimizers' own group dicts right after.
        super().__init__([{"params": params}], {})
        self.param_groups = [group for optimizer in chained for group in optimizer.param_groups]
        self.state.update(merged)
        self._complete = True

    @property
    def state(self) -> dict:  # type: ignore[override]
        """Per-parameter state of every chained optimizer (one dict, shared with each of them)."""
        return self._shared_state

    @state.setter
    def state(self, value: dict) -> None:
        self._shared_state = value
        for optimizer in self.__dict__.get("optimizers", ()):
            optimizer.state = value

    def __setstate__(self, state: dict[str, Any]) -> None:
        # `load_state_dict` hands torch's loaded state and *new* group dicts through here: keep the
        # chained optimizers' own dicts (which their LR schedulers hold) and copy the values in.
        state = dict(state)
        if "state" in state:
            self.state = state.pop("state")
        loaded = state.pop("param_groups", None)
        super().__setstate__(state)
        if loaded is not None:
            own = [group for optimizer in self.optimizers for group in optimizer.param_groups]
            if len(loaded) != len(own):
                raise ValueError(
                    f"the state dict holds {len(loaded)} param groups, the chained optimizers {len(own)}"
                )
            for mine, new in zip(own, loaded, strict=True):
                mine.update(new)
            self.param_groups = own

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Step every chained optimizer (their class's own step, with their own hooks)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for optimizer in self.optimizers:
            type(optimizer).step(optimizer)
        return loss

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if self.__dict__.get("_complete"):  # torch's constructor adds the first group itself
            raise RuntimeError(
                "add a param group to one of the chained optimizers before chaining them, not to the chain"
            )
        super().add_param_group(param_group)


def chained_optimizers(optimizer: torch.optim.Optimizer) -> list[torch.optim.Optimizer]:
    """The optimizers a chain holds, or `[optimizer]` itself."""
    return list(optimizer.optimizers) if isinstance(optimizer, ChainedOptimizer) else [optimizer]


def as_one_optimizer(
    optimizer: torch.optim.Optimizer | Iterable[torch.optim.Optimizer],
) -> torch.optim.Optimizer:
    """An optimizer, or a list of optimizers chained into one."""
    if isinstance(optimizer, torch.optim.Optimizer):
        return optimizer
    if isinstance(optimizer, (list, tuple)):
        return optimizer[0] if len(optimizer) == 1 else ChainedOptimizer(optimizer)
    raise TypeError(
        f"expected a torch optimizer or a list of them (e.g. [muon, adamw]), not {type(optimizer).__name__}"
    )


def owner_of_group(optimizer: torch.optim.Optimizer, group: dict) -> torch.optim.Optimizer:
    """The optimizer whose param group `group` is (the dict itself): a chained one, or `optimizer`."""
    if not isinstance(optimizer, ChainedOptimizer):
        return optimizer
    for child in optimizer.optimizers:
        if any(own is group for own in child.param_groups):
            return child
    raise ValueError("this param group belongs to none of the chained optimizers")


def optimizer_class_name(optimizer: torch.optim.Optimizer) -> str:
    """The optimizer's class as a checkpoint records it; a chain names the classes it chains."""

    def name(cls: type) -> str:
        return f"{cls.__module__}.{cls.__qualname__}"

    if isinstance(optimizer, ChainedOptimizer):
        return f"{name(ChainedOptimizer)}[{','.join(name(type(o)) for o in optimizer.optimizers)}]"
    return name(type(optimizer))
