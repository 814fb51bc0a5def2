"""What a checkpoint holds, worked out alike on every rank from the engine: one record per tensor
(name, shape, dtype, kind, spans) and, for one rank, the tensors that rank writes."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .format import WHOLE_STATE, dtype_name, state_key

if TYPE_CHECKING:
    from ..core.engine_view import EngineView
    from ..core.flat_group import FlatParamGroup


def names_by_tensor(module: nn.Module) -> dict[int, tuple[torch.Tensor, list[str]]]:
    """Every tensor of the module's state dict with all the names it goes by, in state-dict order
    (a tied weight has several)."""
    found: dict[int, tuple[torch.Tensor, list[str]]] = {}
    for name, tensor in module.state_dict(keep_vars=True).items():
        found.setdefault(id(tensor), (tensor, []))[1].append(name)
    return found


def element_state(engine: EngineView, segment: FlatParamGroup) -> tuple[dict[str, torch.Tensor], dict]:
    """A trained segment's optimizer state, split into per-element tensors (shaped like its master
    shard) and scalars (such as `step`, the same for every element)."""
    per_element, scalars = {}, {}
    master = segment.master
    for key, value in engine.optimizer.state.get(master, {}).items():
        if torch.is_tensor(value) and value.dim() > 0:
            if value.shape != master.shape:
                raise ValueError(
                    f"optimizer state {key!r} has shape {tuple(value.shape)}, not the shape of its parameters: "
                    "hf_zero checkpoints hold elementwise optimizer state only"
                )
            per_element[key] = value
        else:
            scalars[key] = encode_value(value, f"optimizer state {key!r}")
    return per_element, scalars


def encode_value(value: Any, what: str) -> Any:
    """`value` as JSON: numbers, strings, lists, and 0-dim tensors as {"tensor": number, "dtype": ...}."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if torch.is_tensor(value) and value.numel() == 1 and value.dim() == 0:
        return {"tensor": value.item(), "dtype": dtype_name(value.dtype)}
    if isinstance(value, (list, tuple)):
        return [encode_value(item, what) for item in value]
    raise ValueError(
        f"{what} is a {type(value).__name__}, which an hf_zero checkpoint cannot record (numbers, strings, "
        "lists and one-element tensors only)"
    )


def whole_state(engine: EngineView) -> tuple[dict[str, dict[str, Any]], list[tuple]]:
    """The optimizer state this rank keeps whole for the parameters it owns (`whole_step.py`):
    what rank 0 records of it by tensor name (the rank holding it, each tensor's shape and dtype,
    the other values), and the tensors this rank writes, as `describe`'s triples. At stage 0 every
    rank holds all of it and rank 0 writes it."""
    plan = engine.whole_step
    described: dict[str, dict[str, Any]] = {}
    writes: list[tuple] = []
    if plan is None or (plan.num_shards == 1 and engine.rank != 0):
        return described, writes
    names = {id(tensor): names[0] for tensor, names in names_by_tensor(engine.module).values()}
    for g, segment in plan.segments.items():
        for slot, param in enumerate(segment.params):
            state = plan.state_of(g, slot)
            if not state:
                continue
            entry: dict[str, Any] = {"rank": engine.rank, "tensors": {}, "values": {}}
            record = {"name": names[id(param)]}
            for key, value in state.items():
                if torch.is_tensor(value):
                    entry["tensors"][key] = [list(value.shape), dtype_name(value.dtype)]
                    writes.append((record, value.reshape(-1), WHOLE_STATE + key))
                else:
                    entry["values"][key] = encode_value(value, f"optimizer state {key!r}")
            described[record["name"]] = entry
    return described, writes


def describe(engine: EngineView, include_frozen: bool) -> tuple[list[dict[str, Any]], list[tuple]]:
    """The manifest's tensor records, and what this rank writes: `(record, source, key)` triples,
    `source` a 1-D tensor of the elements of the record's span on this rank (`key`: "" for the
    values, else the optimizer state's name).

    Sharded segments follow their layout's spans. Tensors kept whole (buffers; below stage 3 the
    frozen weights; stage-0 segments, identical on every rank) are written by one rank each:
    whole tensors go to the rank that has written least so far, unsharded segments to rank 0.
    """
    world = engine.world_size
    located = {
        id(p): (segment, i) for segment in engine.groups + engine.frozen for i, p in enumerate(segment.params)
    }
    all_spans = {}
    for segment in engine.groups + engine.frozen:
        per_slot: list[list] = [[] for _ in segment.params]
        for shard in range(segment.layout.num_shards):
            for span in segment.layout.spans(shard):
                per_slot[span.slot].append([shard, span.param_begin, span.length])
        all_spans[id(segment)] = per_slot
    records: list[dict[str, Any]] = []
    mine: list[tuple] = []
    written = [0] * world
    for tensor, names in names_by_tensor(engine.module).values():
        record: dict[str, Any] = {"name": names[0], "aliases": names[1:], "shape": list(tensor.shape)}
        if id(tensor) in located:
            segment, index = located[id(tensor)]
            if not segment.trainable and not include_frozen:
                continue
            record["kind"] = "trainable" if segment.trainable else "frozen"
            record["dtype"] = dtype_name(segment.original_dtypes[index])
            record["spans"] = all_spans[id(segment)][index]
            if segment.trainable:
                per_element, scalars = element_state(engine, segment)
                record["optimizer_group"] = segment.optimizer_group
                record["stored_dtype"] = "float32"
                record["state"] = {key: dtype_name(value.dtype) for key, value in per_element.items()}
                record["scalars"] = scalars
                sources = {"": segment.master.data, **per_element}
            else:
                record["stored_dtype"] = dtype_name(segment.compute_dtype)
                sources = {"": segment.shard16}
            writer = engine.rank if segment.layout.num_shards > 1 else 0
            for span in segment.spans_by_slot[index] if writer == engine.rank else []:
                for key, source in sources.items():
                    mine.append((record, source[span.shard_begin : span.shard_begin + span.length], key))
        else:
            is_param = isinstance(tensor, nn.Parameter)
            if is_param and not include_frozen:
                continue
            dtype = engine.frozen_dtypes.get(id(tensor), tensor.dtype)
            record["kind"] = "frozen" if is_param else "buffer"
            record["dtype"] = record["stored_dtype"] = dtype_name(dtype)
            owner = min(range(world), key=lambda r: (written[r], r))
            written[owner] += tensor.numel() * dtype.itemsize
            record["spans"] = [[owner, 0, tensor.numel()]] if tensor.numel() else []
            if owner == engine.rank and tensor.numel():
                mine.append((record, engine.host_copy(tensor).reshape(-1), ""))
        records.append(record)
    return records, mine


def rank_tensors(writes: list) -> dict[str, torch.Tensor]:
    """The tensors of one rank's file, by file key, on the host: views of tensors already there
    (nothing changes them while a synchronous save writes), copies of those on the device."""
    return {
        state_key(record["name"], key): source.detach().to("cpu").contiguous()
        for record, source, key in writes
    }
