"""The checkpoint format: a folder of per-rank safetensors files described by one JSON manifest.

```
CKPT/
  manifest.json                  what every tensor is and where its elements are (see below)
  rank-00000-of-00004.safetensors   one file per rank that holds something
  ...
```

Each rank's file holds, for every tensor, the elements that rank owns as one flat run: under the
tensor's name its values (fp32 masters for trained weights; frozen weights and buffers in their own
dtype), and under `NAME::KEY` the optimizer state `KEY` (`exp_avg`, ...) of the same elements.
Every supported optimizer is elementwise, so these runs reshard exactly: a loader on any number of
ranks reads, for each element it owns in its own layout, the runs that hold it.

The manifest records per tensor its name (and the other names it is tied under), shape, dtype,
kind (`trainable`, `frozen`, `buffer`), param group, scalar optimizer state (`step`) and its
*spans* `[rank, begin, length]` (elements `begin .. begin + length` of the flattened tensor are in
that rank's file), plus the run's world size, stage, optimizer class and param-group
hyper-parameters, per-rank RNG states, the step count, the model's `config.json` and generation
config, and the size and SHA-256 of every file. Tensors only in the safetensors files, JSON only in
the manifest: a checkpoint holds no pickles.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

MANIFEST = "manifest.json"
# Where ZeroTrainer and ZeroAccelerator put the engine's checkpoint inside their own checkpoint folder.
TRAINER_SUBFOLDER = "hf_zero_checkpoint"
FORMAT = "hf_zero.checkpoint"
FORMAT_VERSION = 1
STATE_SEPARATOR = "::"


class CheckpointError(ValueError):
    """A checkpoint that is damaged, incomplete or made for another model; the message names the
    file or the first parameter at fault and what to do."""


def rank_file_name(rank: int, world_size: int) -> str:
    """The file holding rank `rank`'s part of a checkpoint saved on `world_size` ranks."""
    return f"rank-{rank:05d}-of-{world_size:05d}.safetensors"


# Optimizer state kept whole at a parameter's owner is filed under this prefix (`records.whole_state`).
WHOLE_STATE = "whole/"


def state_key(name: str, key: str) -> str:
    """The key, in a rank's file, of optimizer state `key` of tensor `name` ("" for the values)."""
    return f"{name}{STATE_SEPARATOR}{key}" if key else name


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_of(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise CheckpointError(f"the manifest names dtype {name!r}, which torch does not have")
    return dtype


def sha256_of(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes, read in 1 MiB blocks (a merge holds little else)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def is_checkpoint(folder: str | os.PathLike) -> bool:
    """Whether `folder` holds an hf_zero checkpoint manifest."""
    return (Path(folder) / MANIFEST).is_file()


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """The folder holding the manifest: `path` itself, or the `hf_zero_checkpoint` folder inside a
    ZeroTrainer or ZeroAccelerator checkpoint folder."""
    path = Path(path)
    for candidate in (path, path / TRAINER_SUBFOLDER):
        if is_checkpoint(candidate):
            return candidate
    raise FileNotFoundError(
        f"{str(path)!r} holds no hf_zero checkpoint: no {MANIFEST} in it or in its {TRAINER_SUBFOLDER}/ "
        "folder (a save that did not finish has none; use an earlier checkpoint)"
    )


def read_manifest(folder: str | os.PathLike) -> dict[str, Any]:
    """The manifest of checkpoint `folder`, checked for the fields every reader relies on."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder {str(folder)!r} does not exist")
    if not path.is_file():
        raise FileNotFoundError(
            f"{str(folder)!r} has no {MANIFEST}: it is not an hf_zero checkpoint, or its save did not finish "
            "(a save writes the manifest last); resume from an earlier checkpoint"
        )
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path} is not valid JSON ({error}): the manifest is damaged") from error
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an hf_zero checkpoint manifest (no 'format': {FORMAT!r})")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format version {version}, but this hf_zero reads version {FORMAT_VERSION}; "
            "load it with the hf_zero release that wrote it"
        )
    for field in ("world_size", "stage", "files", "tensors", "optimizer"):
        if field not in manifest:
            raise CheckpointError(f"{path} has no {field!r}: the manifest is damaged")
    return manifest


def check_files(folder: str | os.PathLike, manifest: dict[str, Any], names: list[str] | None = None) -> None:
    """Every file the manifest lists is present with its recorded size (cheap: no data is read)."""
    folder = Path(folder)
    for name in manifest["files"] if names is None else names:
        path = folder / name
        if not path.is_file():
            raise CheckpointError(
                f"checkpoint {str(folder)!r} lacks {name}, which its manifest lists: the file was deleted or "
                "not copied; restore it or resume from another checkpoint"
            )
        expected, actual = manifest["files"][name]["bytes"], path.stat().st_size
        if actual != expected:
            raise CheckpointError(
                f"{path} holds {actual} bytes but the manifest recorded {expected}: the file is truncated or "
                "damaged; resume from another checkpoint"
            )


def checksum_mismatch(folder: str | os.PathLike, manifest: dict[str, Any], name: str) -> str | None:
    """An error message when file `name` does not hash to the manifest's SHA-256, else None."""
    path = Path(folder) / name
    if sha256_of(path) != manifest["files"][name]["sha256"]:
        return (
            f"{path} does not match the SHA-256 its manifest recorded: the file was changed or damaged after "
            "it was saved; resume from another checkpoint"
        )
    return None
