"""Saving a checkpoint so that it appears complete or not at all.

Every rank writes its file into one temporary folder beside the target and flushes it to disk;
the ranks then report (file size, SHA-256, RNG state, or the error they met) to rank 0, which
writes the manifest, flushes it, and renames the folder into place. A process killed at any point
leaves the target as it was (an earlier checkpoint there stays loadable) plus, at worst, a
`.NAME.partial-*` folder that nothing mistakes for a checkpoint. An error on any rank (a full
disk, an unwritable folder) is raised on every rank, so none is left waiting in a collective.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..core.chained_optimizer import optimizer_class_name
from ..core.params import is_peft_model
from ..core.safetensors_file import fsync_path, write_safetensors
from ..core.watchdog import launcher_store
from ..version import __version__
from .background import BackgroundSaves, StoreExchange
from .format import FORMAT, FORMAT_VERSION, MANIFEST, is_checkpoint, rank_file_name
from .records import describe, encode_value, rank_tensors, whole_state
from .rng import capture_rng

if TYPE_CHECKING:
    from ..core.engine_view import EngineView


def save_checkpoint(
    engine: EngineView,
    directory: str | os.PathLike,
    include_frozen: bool = True,
    background: BackgroundSaves | None = None,
) -> Path:
    """Write the engine's training state into the folder `directory` (see `format.py`).

    Every rank must call it. With `include_frozen=False` frozen weights are left out (an adapter's
    checkpoint need not copy the base model it was built on; resuming then takes them from the
    model). `directory` may be an earlier checkpoint, which is replaced once the new one is
    complete; anything else already there is refused. Returns the checkpoint folder.

    With `background` (see `background.py`) it returns as soon as this rank's tensors are copied
    to host buffers; a thread writes and finishes the checkpoint, and `background.wait()` says
    how that went.
    """
    target = Path(directory).absolute()
    comm = engine.comm
    temporary = _agree(engine, lambda: _make_temporary(target), "prepare")
    try:
        # Every rank builds the manifest (only rank 0 writes it), so that a value it cannot record
        # raises on every rank alike rather than leaving the others waiting below.
        records, mine = describe(engine, include_frozen)
        owned_state, owned_writes = whole_state(engine)
        mine += owned_writes
        job = _SaveJob(
            rank=engine.rank,
            world_size=engine.world_size,
            step=engine.global_steps,
            manifest=_manifest(engine, records, include_frozen),
            rng=capture_rng(engine.device),
            temporary=temporary,
            target=target,
            whole_state=owned_state,
        )
        if background is not None:
            tensors = background.snapshot.take(mine)
            exchange = StoreExchange(
                launcher_store() if engine.world_size > 1 else None,
                f"hf_zero/checkpoint/{temporary.name}",
                engine.rank,
                engine.world_size,
                engine.config.collective_timeout,
            )
            background.start(target, lambda: _write_and_finish(job, tensors, exchange))
            temporary = None  # the background save owns it now
            return target
        _write_and_finish(job, rank_tensors(mine), _CommExchange(comm))
    finally:
        if temporary is not None:
            if engine.rank == 0 and temporary.exists():
                shutil.rmtree(temporary, ignore_errors=True)
            comm.barrier()
    return target


@dataclass
class _SaveJob:
    """What writing and finishing one save needs, fixed when the save begins."""

    rank: int
    world_size: int
    step: int
    manifest: dict[str, Any]
    rng: dict[str, Any]
    temporary: Path
    target: Path
    whole_state: dict[str, Any]  # this rank's record of the optimizer state it keeps whole


class _CommExchange:
    """`StoreExchange`'s two calls over the engine's communicator (a synchronous save)."""

    def __init__(self, comm: Any) -> None:
        self.comm = comm

    def gather_to_first(self, value: Any) -> list[Any]:
        return self.comm.all_gather_object(value)

    def broadcast_from_first(self, value: Any) -> Any:
        return self.comm.broadcast_object(value)


def _write_and_finish(job: _SaveJob, tensors: dict[str, torch.Tensor], exchange: Any) -> None:
    """Write this rank's file; rank 0 then writes the manifest and moves the folder into place (or
    removes it when any rank failed). Raises on every rank when the checkpoint is not complete."""
    reports = exchange.gather_to_first(_run(lambda: _write_rank_file(job, tensors)))
    outcome = None
    if job.rank == 0:
        failed = [message for ok, message in reports if not ok]
        if failed:
            outcome = (False, f"saving checkpoint {job.target} failed: {failed[0]}")
        else:
            finished = _run(lambda: _publish(_completed(job.manifest, reports), job.temporary, job.target))
            outcome = finished if finished[0] else (False, f"cannot finish the checkpoint: {finished[1]}")
        if job.temporary.exists():
            shutil.rmtree(job.temporary, ignore_errors=True)
    ok, message = exchange.broadcast_from_first(outcome)
    if not ok:
        raise OSError(message)


def _completed(manifest: dict[str, Any], reports: list) -> dict[str, Any]:
    """The manifest with what the ranks reported: their RNG states, their files, and the optimizer
    state each keeps whole, recorded with its tensor."""
    manifest["rng"] = [info["rng"] for _, info in reports]
    by_name = {record["name"]: record for record in manifest["tensors"]}
    for _, info in reports:
        for name, entry in info["whole_state"].items():
            by_name[name]["whole_state"] = entry
    manifest["files"] = {
        info["file"]: {"bytes": info["bytes"], "sha256": info["sha256"]}
        for _, info in reports
        if info["file"] is not None
    }
    return manifest


def _run(action) -> tuple[bool, Any]:
    """(True, what `action` returned) or (False, the error it raised, in words)."""
    try:
        return True, action()
    except Exception as error:  # reported to every rank, then raised there
        return False, f"{type(error).__name__}: {error}"


def _agree(engine: EngineView, action, what: str) -> Any:
    """Rank 0 runs `action`; every rank gets its result, or raises its error."""
    ok, value = engine.comm.broadcast_object(_run(action) if engine.rank == 0 else None)
    if not ok:
        raise OSError(f"cannot {what} the checkpoint: {value}")
    return value


def _make_temporary(target: Path) -> Path:
    """A fresh folder beside `target` for the save, after checking that `target` may be replaced."""
    if target.exists() and not (target.is_dir() and (is_checkpoint(target) or not any(target.iterdir()))):
        raise FileExistsError(
            f"{target} exists and is not an hf_zero checkpoint; save into a new folder (or remove it first)"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.parent / f".{target.name}.partial-{uuid.uuid4().hex[:8]}"
    temporary.mkdir()
    return temporary


def _write_rank_file(job: _SaveJob, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Write this rank's tensors (if it has any), flushed to disk; what rank 0 records of the file."""
    info: dict[str, Any] = {"rng": job.rng, "file": None, "whole_state": job.whole_state}
    if tensors:
        name = rank_file_name(job.rank, job.world_size)
        size, digest = write_safetensors(
            job.temporary / name, tensors, {"format": "pt", "hf_zero": "checkpoint shard"}
        )
        info.update(file=name, bytes=size, sha256=digest)
    return info


def _manifest(engine: EngineView, records: list[dict[str, Any]], include_frozen: bool) -> dict[str, Any]:
    optimizer = engine.optimizer
    groups = [
        {
            key: encode_value(value, f"hyper-parameter {key!r} of param group {index}")
            for key, value in group.items()
            if key not in ("params", "param_names")
        }
        for index, group in enumerate(optimizer.param_groups)
    ]
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "hf_zero_version": __version__,
        "world_size": engine.world_size,
        "stage": engine.config.stage,
        "precision": engine.config.precision,
        "global_steps": engine.global_steps,
        "optimizer": {
            "class": optimizer_class_name(optimizer),
            "param_groups": groups,
        },
        # fp16: the loss scale and its history (None in fp32/bf16).
        "loss_scaler": engine.loss_scaler.state_dict() if engine.loss_scaler is not None else None,
        "frozen_included": include_frozen,
        "model": _model_record(engine.module),
        "tensors": records,
    }


def _model_record(module) -> dict[str, Any]:
    """What rebuilds a loadable folder: the model class, its config and generation config."""
    from transformers import PretrainedConfig

    record: dict[str, Any] = {"class": type(module).__name__, "peft": is_peft_model(module)}
    config = getattr(module, "config", None)
    if isinstance(config, PretrainedConfig) and not record["peft"]:
        record["config"] = json.loads(config.to_json_string(use_diff=False))
        generation = getattr(module, "generation_config", None)
        can_generate = getattr(module, "can_generate", lambda: False)
        if generation is not None and can_generate():
            record["generation_config"] = json.loads(generation.to_json_string(use_diff=True))
    return record


def _publish(manifest: dict[str, Any], temporary: Path, target: Path) -> None:
    """Write the manifest last, then move the finished folder into place. An earlier checkpoint at
    the target is swapped out in one atomic step where the system can (Linux), so no moment passes
    without a complete checkpoint there; elsewhere it is moved aside just before."""
    path = temporary / MANIFEST
    path.write_text(json.dumps(manifest, indent=1) + "\n")
    fsync_path(path)
    fsync_path(temporary)
    if not target.exists():
        os.replace(temporary, target)
    elif _exchange(temporary, target):
        shutil.rmtree(temporary, ignore_errors=True)  # now the earlier checkpoint
    else:
        replaced = target.parent / f".{target.name}.replaced-{uuid.uuid4().hex[:8]}"
        os.replace(target, replaced)
        os.replace(temporary, target)
        shutil.rmtree(replaced, ignore_errors=True)
    fsync_path(target.parent)


def _exchange(first: Path, second: Path) -> bool:
    """Swap two folders atomically (Linux `renameat2` with RENAME_EXCHANGE); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    result = renameat2(at_fdcwd, os.fsencode(first), at_fdcwd, os.fsencode(second), rename_exchange)
    return result == 0
