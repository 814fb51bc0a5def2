"""The public calls on parameters trained by hf_zero: `full_grad` and `gathered_parameters`
(exported as `hf_zero.full_grad` and `hf_zero.gathered_parameters`). They find the engine through
the registry, so the PyTorch calls routed to the engine can use them too."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch

from .registry import engine_of_parameter


def full_grad(param: torch.Tensor) -> torch.Tensor:
    """The complete rank-averaged fp32 gradient of a parameter trained by hf_zero (see
    `ZeroEngine.full_grad`); a collective every rank must call."""
    engine = engine_of_parameter(param)
    if engine is None:
        raise ValueError("full_grad: this tensor is not a parameter trained by an hf_zero engine")
    return engine.full_grad(param)


@contextlib.contextmanager
def gathered_parameters(params: Iterable[torch.Tensor], modifier_rank: int | None = None) -> Iterator[None]:
    """Give the code inside the block the complete values of `params` (every rank must enter it).

    At stage 3 the units holding the parameters are gathered for the block and kept gathered while
    it runs (forward passes inside it gather nothing more); elsewhere parameters are whole anyway.
    With `modifier_rank`, the values that rank leaves in the parameters at the end of the block are
    written back everywhere: into every rank's copy, its shard and its fp32 masters. Without it,
    edits are discarded at stage 3 (and stay rank-local elsewhere) and the masters are untouched.
    """
    params = list(params)
    engines = {id(e): e for e in (engine_of_parameter(p) for p in params) if e is not None}
    if len(engines) > 1:
        raise ValueError(
            "gathered_parameters was given parameters of several hf_zero engines; use one block each"
        )
    if not engines:
        yield
        return
    (engine,) = engines.values()
    gatherer = engine.gatherer
    units = sorted({engine.unit_of[id(p)] for p in params if id(p) in engine.unit_of})
    pinned = [u for u in units if gatherer is not None and u not in gatherer.pinned]
    for unit in pinned:  # ascending unit order: the same on every rank
        gatherer.gather(unit)
        gatherer.pinned.add(unit)
    before = (
        [p.detach().clone() for p in params]
        if modifier_rank is not None and engine.rank == modifier_rank
        else None
    )
    try:
        yield
        if modifier_rank is not None:
            engine.write_back(params, modifier_rank, before)
    finally:
        for unit in pinned:
            gatherer.pinned.discard(unit)
            gatherer.release(unit)
        if gatherer is not None:
            gatherer.weights_changed()
