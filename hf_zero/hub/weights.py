"""The weights of a `save_pretrained` folder (one safetensors file or an indexed set of them): the
files, their headers (where each tensor's bytes are), and all of them loaded at once."""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# The dtype names of the safetensors format.
SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_HEADER_LIMIT = 100_000_000  # what the safetensors library itself accepts


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor of a safetensors file lies: its file, key, dtype, shape and the absolute
    byte offset of its (row-major, little-endian) data."""

    file: Path
    key: str
    dtype: torch.dtype
    shape: torch.Size
    start: int

    @property
    def numel(self) -> int:
        return self.shape.numel()

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


def weight_files(folder: str | os.PathLike) -> list[Path]:
    """The safetensors files of a `save_pretrained` folder: the shards its index names, else its one file.

    Raises `FileNotFoundError` naming what is missing: the folder, its weights, or a shard the index names.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{str(folder)!r} is not a folder: expected a folder written by save_pretrained"
        )
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as error:
            raise ValueError(
                f"{index} is not a safetensors index (no valid 'weight_map'): {error}"
            ) from error
        missing = [name for name in names if not (folder / name).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{index} names {missing[:3]} but {'it is' if len(missing) == 1 else 'they are'} not in "
                f"{str(folder)!r}: the folder was not completely written or copied; copy the missing files"
            )
        return [folder / name for name in names]
    if (folder / SINGLE_FILE).is_file():
        return [folder / SINGLE_FILE]
    others = sorted(path.name for path in folder.glob("*.bin"))
    hint = (
        f" (it holds {others[:2]}: re-save it with save_pretrained, which writes safetensors)"
        if others
        else ""
    )
    raise FileNotFoundError(
        f"no {SINGLE_FILE} or {INDEX_FILE} in {str(folder)!r}{hint}: expected a folder written by save_pretrained"
    )


def read_header(path: str | os.PathLike) -> dict[str, TensorEntry]:
    """The tensors of one safetensors file, read from its header only (no tensor data is read)."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as file:
        prefix = file.read(8)
        length = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else -1
        if not 0 < length <= min(_HEADER_LIMIT, size - 8):
            raise ValueError(f"{path} is not a safetensors file: its header length is invalid")
        try:
            header = json.loads(file.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(
                f"{path} is not a safetensors file: its header is not valid JSON ({error})"
            ) from error
    data_start = 8 + length
    entries = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        dtype = SAFETENSORS_DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise ValueError(
                f"{path}: tensor {key!r} has dtype {info.get('dtype')!r}, which hf_zero cannot read"
            )
        shape = torch.Size(info["shape"])
        begin, end = info["data_offsets"]
        if end - begin != shape.numel() * dtype.itemsize or data_start + end > size:
            raise ValueError(
                f"{path}: tensor {key!r} of shape {tuple(shape)} claims bytes {begin}..{end}, which do not fit its "
                "shape or lie past the end of the file; the file is damaged or truncated"
            )
        entries[key] = TensorEntry(path, key, dtype, shape, data_start + begin)
    return entries


def read_headers(folder: str | os.PathLike) -> dict[str, TensorEntry]:
    """Every tensor of a `save_pretrained` folder's weights (see `weight_files`), from the headers only."""
    entries: dict[str, TensorEntry] = {}
    for path in weight_files(folder):
        for key, entry in read_header(path).items():
            if key in entries:
                raise ValueError(
                    f"tensor {key!r} is in both {entries[key].file} and {path}; keep one of them"
                )
            entries[key] = entry
    return entries


def load_pretrained_weights(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of the safetensors weights in `folder`, on the CPU."""
    state: dict[str, torch.Tensor] = {}
    for path in weight_files(folder):
        state.update(load_file(path))
    return state
