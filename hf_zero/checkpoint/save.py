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
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors.torch import save_file

from ..core.params import is_peft_model
from ..version import __version__
from .format import FORMAT, FORMAT_VERSION, MANIFEST, fsync_path, is_checkpoint, rank_file_name, sha256_of
from .records import describe, encode_value, rank_tensors
from .rng import capture_rng

if TYPE_CHECKING:
    from ..core.engine_view import EngineView


def save_checkpoint(engine: EngineView, directory: str | os.PathLike, include_frozen: bool = True) -> Path:
    """Write the engine's training state into the folder `directory` (see `format.py`).

    Every rank must call it. With `include_frozen=False` frozen weights are left out (an adapter's
    checkpoint need not copy the base model it was built on; resuming then takes them from the
    model). `directory` may be an earlier checkpoint, which is replaced once the new one is
    complete; anything else already there is refused. Returns the checkpoint folder.
    """
    target = Path(directory).absolute()
    comm = engine.comm
    temporary = _agree(engine, lambda: _make_temporary(target), "prepare")
    try:
        # Every rank builds the manifest (only rank 0 writes it), so that a value it cannot record
        # raises on every rank alike rather than leaving the others waiting below.
        records, mine = describe(engine, include_frozen)
        manifest = _manifest(engine, records, include_frozen)
        report = _run(lambda: _write_rank_file(engine, temporary, mine))
        reports = comm.all_gather_object(report)
        failed = [message for ok, message in reports if not ok]
        if failed:
            raise OSError(f"saving checkpoint {target} failed: {failed[0]}")
        if engine.rank == 0:
            manifest["rng"] = [info["rng"] for _, info in reports]
            manifest["files"] = {
                info["file"]: {"bytes": info["bytes"], "sha256": info["sha256"]}
                for _, info in reports
                if info["file"] is not None
            }
        _agree(engine, lambda: _publish(manifest, temporary, target), "finish")
    finally:
        if engine.rank == 0 and temporary.exists():
            shutil.rmtree(temporary, ignore_errors=True)
        comm.barrier()
    return target


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


def _write_rank_file(engine: EngineView, folder: Path, mine: list) -> dict[str, Any]:
    """Write this rank's tensors (if it has any) and flush them; what rank 0 records of the file."""
    info: dict[str, Any] = {"rng": capture_rng(engine.device), "file": None}
    if mine:
        name = rank_file_name(engine.rank, engine.world_size)
        path = folder / name
        save_file(rank_tensors(mine), str(path), metadata={"format": "pt", "hf_zero": "checkpoint shard"})
        fsync_path(path)
        info.update(file=name, bytes=path.stat().st_size, sha256=sha256_of(path))
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
            "class": f"{type(optimizer).__module__}.{type(optimizer).__qualname__}",
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
