"""Loading a checkpoint into an engine of any world size and stage, resharding on the way.

Each rank cuts its own shard, in its own layout, out of the saved spans: for every element it
owns it reads the bytes of the saved run that holds it (`SpanReader`), for the fp32 masters and for
every per-element optimizer state alike; scalar state (`step`) is copied. Before anything changes,
the manifest is checked against the model (names, shapes, which weights train, param groups,
optimizer class) and every file against its recorded size and SHA-256 (each rank hashes a share of
the files), and the first problem is raised, on every rank, naming the file or the parameter.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..core.chained_optimizer import optimizer_class_name
from .format import (
    TRAINER_SUBFOLDER,
    WHOLE_STATE,
    CheckpointError,
    check_files,
    checksum_mismatch,
    dtype_of,
    read_manifest,
    state_key,
)
from .reader import SpanReader
from .records import names_by_tensor
from .rng import restore_rng

if TYPE_CHECKING:
    from ..core.engine_view import EngineView
    from ..core.flat_group import FlatParamGroup


def load_checkpoint(
    engine: EngineView, directory: str | os.PathLike, restore_rng_state: bool = True, verify: bool = True
) -> dict[str, Any]:
    """Restore the training state `save_checkpoint` wrote into `directory`; returns its manifest.

    Every rank must call it. The checkpoint may come from any number of ranks and any stage. With
    `restore_rng_state`, each rank's random generators are set as they were when saved (only on
    the same number of ranks: otherwise there is no one state per rank to take). `verify=False`
    skips the SHA-256 check (sizes are still checked). When the checkpoint was saved on another
    number of ranks or at another stage, rank 0 prints one line saying what was resharded.
    """
    folder = Path(directory)
    manifest = read_manifest(folder)
    check_files(folder, manifest)
    if verify:
        _verify_checksums(engine, folder, manifest)
    records = _match_records(engine, manifest)
    # An fp16 run resumes its loss scale (checked now, set last); one from fp32/bf16 starts afresh.
    scaler_state = manifest.get("loss_scaler") if engine.loss_scaler is not None else None
    if scaler_state is not None:
        try:
            # (a fresh scaler of the engine's kind checks the record, leaving the engine's alone)
            type(engine.loss_scaler)(engine.config).load_state_dict(scaler_state)
        except (TypeError, ValueError) as error:
            raise CheckpointError(
                f"{folder}: the manifest's loss_scaler record is damaged: {error}"
            ) from error
    reader = SpanReader(folder, manifest)
    try:
        with torch.no_grad():
            for segment in engine.groups + engine.frozen:
                _load_segment_values(reader, segment, [records.get(id(p)) for p in segment.params])
            for tensor, record in _whole_tensors(engine, records):
                tensor.data.copy_(reader.read_whole(record))
            _load_optimizer_state(engine, reader, records, manifest["optimizer"]["param_groups"])
            _load_whole_state(engine, reader, records)
            engine.publish_masters()
    finally:
        reader.close()
    engine.loaded_bytes = reader.bytes_read
    engine.global_steps = manifest.get("global_steps", 0)
    if scaler_state is not None:
        engine.loss_scaler.load_state_dict(scaler_state)
    if restore_rng_state and manifest["world_size"] == engine.world_size and manifest.get("rng"):
        restore_rng(manifest["rng"][engine.rank], engine.device)
    note = _reshard_note(folder, manifest, engine.world_size, engine.config.stage)
    if note and engine.rank == 0:
        print(f"hf_zero: {note}", flush=True)
    return manifest


def _reshard_note(folder: Path, manifest: dict[str, Any], world_size: int, stage: int) -> str | None:
    """`resharded checkpoint-20: saved by 2 processes at stage 2, loaded into 3 processes at
    stage 3`, or None when the checkpoint was saved on this layout. A Trainer checkpoint is named
    by its `checkpoint-N` folder, not the `hf_zero_checkpoint` inside it."""
    saved_world, saved_stage = manifest["world_size"], manifest["stage"]
    if (saved_world, saved_stage) == (world_size, stage):
        return None
    folder = folder.absolute()
    name = folder.parent.name if folder.name == TRAINER_SUBFOLDER else folder.name

    def processes(count: int) -> str:
        return f"{count} process" if count == 1 else f"{count} processes"

    return (
        f"resharded {name}: saved by {processes(saved_world)} at stage {saved_stage}, loaded into "
        f"{processes(world_size)} at stage {stage}"
    )


def _verify_checksums(engine: EngineView, folder: Path, manifest: dict[str, Any]) -> None:
    """Each rank hashes every world-size-th file; the first mismatch found is raised everywhere."""
    names = sorted(manifest["files"])
    mine = names[engine.rank :: engine.world_size]
    problem = next((m for m in (checksum_mismatch(folder, manifest, name) for name in mine) if m), None)
    problems = [p for p in engine.comm.all_gather_object(problem) if p]
    if problems:
        raise CheckpointError(problems[0])


def _match_records(engine: EngineView, manifest: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """id(tensor) -> its record, for every tensor of the model the checkpoint holds, after checking
    that the checkpoint was made for this model and this optimizer."""
    saved: dict[str, dict[str, Any]] = {}
    for record in manifest["tensors"]:
        for name in [record["name"], *record.get("aliases", [])]:
            saved[name] = record
    trained = {id(p): segment for segment in engine.groups for p in segment.params}
    include_frozen = manifest.get("frozen_included", True)
    matched: dict[int, dict[str, Any]] = {}
    used: set[str] = set()
    for tensor, names in names_by_tensor(engine.module).values():
        record = next((saved[name] for name in names if name in saved), None)
        segment = trained.get(id(tensor))
        if record is None:
            if segment is None and not include_frozen and isinstance(tensor, torch.nn.Parameter):
                continue  # frozen weights were left out of this checkpoint: the model's own stay
            raise CheckpointError(
                f"the checkpoint has no tensor {names[0]!r}, which the model has: it was saved for a different "
                "model (or a different PEFT configuration)"
            )
        used.add(record["name"])
        if list(record["shape"]) != list(tensor.shape):
            raise CheckpointError(
                f"parameter {names[0]!r} has shape {tuple(tensor.shape)} in the model but "
                f"{tuple(record['shape'])} in the checkpoint: it was saved for a different model"
            )
        was_trained = record["kind"] == "trainable"
        if was_trained != (segment is not None):
            now, then = ("trained", "frozen") if segment is not None else ("frozen", "trained")
            raise CheckpointError(
                f"parameter {names[0]!r} is {now} now but was {then} when the checkpoint was saved, so there "
                "is no optimizer state to resume; resume with the same trainable parameters"
            )
        if segment is not None and record["optimizer_group"] != segment.optimizer_group:
            raise CheckpointError(
                f"parameter {names[0]!r} is in param group {segment.optimizer_group} of the optimizer but was in "
                f"group {record['optimizer_group']} when saved; build the param groups as the saved run did"
            )
        matched[id(tensor)] = record
    extra = [record["name"] for record in manifest["tensors"] if record["name"] not in used]
    if extra:
        raise CheckpointError(
            f"the checkpoint holds {extra[:3]}, which the model does not have: it was saved for a different model"
        )
    _check_optimizer(engine, manifest["optimizer"])
    return matched


def _check_optimizer(engine: EngineView, saved: dict[str, Any]) -> None:
    optimizer = engine.optimizer
    name = optimizer_class_name(optimizer)
    if saved["class"] != name:
        raise CheckpointError(
            f"the checkpoint holds the state of a {saved['class']} but the engine runs a {name}; resume with "
            "the optimizer the checkpointed run used"
        )
    if len(saved["param_groups"]) != len(optimizer.param_groups):
        raise CheckpointError(
            f"the checkpoint's optimizer has {len(saved['param_groups'])} param group(s), the engine's "
            f"{len(optimizer.param_groups)}; build the param groups as the saved run did"
        )


def _load_segment_values(reader: SpanReader, segment: FlatParamGroup, records: Sequence[dict | None]) -> None:
    """This rank's fp32 master shard (trained segment) or 16-bit shard (stage-3 frozen segment)."""
    if not segment.params or any(record is None for record in records):
        return  # frozen weights the checkpoint left out

    def values(slot: int, begin: int, length: int) -> torch.Tensor:
        return reader.read(records[slot], "", begin, length)

    if segment.trainable:
        shard = segment.layout.shards_of(values, segment.rank, [torch.float32], segment.master.device)[0]
        segment.master.data.copy_(shard)
    else:
        shard = segment.layout.shards_of(
            values, segment.rank, [segment.compute_dtype], segment.shard16.device
        )[0]
        segment.shard16.copy_(shard)


def _whole_tensors(engine: EngineView, records: dict[int, dict[str, Any]]) -> list[tuple[torch.Tensor, dict]]:
    """The tensors the engine keeps whole on every rank (buffers; below stage 3 frozen weights)."""
    in_segments = {id(p) for segment in engine.groups + engine.frozen for p in segment.params}
    return [
        (tensor, records[id(tensor)])
        for tensor, _ in names_by_tensor(engine.module).values()
        if id(tensor) not in in_segments and id(tensor) in records
    ]


def _load_optimizer_state(
    engine: EngineView, reader: SpanReader, records: dict[int, dict[str, Any]], saved_groups: list[dict]
) -> None:
    """Cut each master shard's optimizer state out of the saved spans and hand it to the optimizer,
    with the saved hyper-parameters, through `load_state_dict` (which casts and places it)."""
    segment_of = {id(segment.master): segment for segment in engine.groups}
    state: dict[int, dict[str, Any]] = {}
    groups = []
    position = 0
    for group, saved in zip(engine.optimizer.param_groups, saved_groups, strict=True):
        positions = []
        for master in group["params"]:
            segment = segment_of[id(master)]
            shard_state = _segment_state(reader, segment, [records[id(p)] for p in segment.params])
            if shard_state:
                state[position] = shard_state
            positions.append(position)
            position += 1
        hyperparameters = {key: decode_value(value, group.get(key)) for key, value in saved.items()}
        groups.append({**hyperparameters, "params": positions})
    engine.optimizer.load_state_dict({"state": state, "param_groups": groups})


def _load_whole_state(engine: EngineView, reader: SpanReader, records: dict[int, dict[str, Any]]) -> None:
    """The optimizer state kept whole at each parameter's owner (`whole_step.py`): this rank reads
    that of the parameters it owns now, from the file of the rank that owned them when saved."""
    plan = engine.whole_step
    if plan is None:
        return
    plan.states.clear()
    for g, segment in plan.segments.items():
        for slot, param in enumerate(segment.params):
            record = records.get(id(param))
            saved = record.get("whole_state") if record is not None else None
            if saved is None or plan.owner_of(g, slot) != plan.rank:
                continue
            state: dict[str, Any] = {}
            for key, (shape, dtype) in saved["tensors"].items():
                values = reader.read_entry(saved["rank"], state_key(record["name"], WHOLE_STATE + key))
                if values.dtype != dtype_of(dtype) or values.numel() != torch.Size(shape).numel():
                    raise CheckpointError(
                        f"the optimizer state {key!r} of {record['name']!r} in rank {saved['rank']}'s file is not the "
                        f"{dtype} tensor of shape {shape} the manifest records: the file does not belong to it"
                    )
                # (a 0-dim count, such as a step, stays on the host as the optimizer keeps it)
                device = segment.master.device if len(shape) else values.device
                state[key] = values.view(shape).to(device)
            state.update({key: decode_value(value, None) for key, value in saved["values"].items()})
            plan.set_state(g, slot, state)


def _segment_state(reader: SpanReader, segment: FlatParamGroup, records: list[dict]) -> dict[str, Any]:
    if not records:
        return {}
    keys = (set(records[0]["state"]), set(records[0]["scalars"]))
    for record in records:
        if (set(record["state"]), set(record["scalars"])) != keys:
            raise CheckpointError(
                f"the checkpoint holds optimizer state {sorted(record['state'])} for {record['name']!r} but "
                f"{sorted(records[0]['state'])} for {records[0]['name']!r}, which the engine keeps in one shard: "
                "the manifest is damaged"
            )
    result: dict[str, Any] = {}
    for key in records[0]["state"]:  # in the order saved: checkpoints written after a resume are reproducible

        def values(slot: int, begin: int, length: int, key: str = key) -> torch.Tensor:
            return reader.read(records[slot], key, begin, length)

        dtype = dtype_of(records[0]["state"][key])
        result[key] = segment.layout.shards_of(values, segment.rank, [dtype], segment.master.device)[0]
    for key in keys[1]:
        result[key] = decode_value(records[0]["scalars"][key], None)
    return result


def decode_value(value: Any, current: Any) -> Any:
    """Undo `encode_value`: one-element tensors come back as tensors, lists as tuples where the
    engine's own value is a tuple (Adam's `betas`)."""
    if isinstance(value, dict) and "tensor" in value:
        return torch.tensor(value["tensor"], dtype=dtype_of(value["dtype"]))
    if isinstance(value, list):
        items = [decode_value(item, None) for item in value]
        return tuple(items) if isinstance(current, tuple) else items
    return value
