"""A checkpoint's rank files: safetensors written straight from the shards' tensors, flushed to
disk, with the SHA-256 of the bytes computed on the way out.

`safetensors.torch.save_file` refuses tensors that share storage, which the slices of one flat
shard do, so each had to be copied first; and a checksum of its file needs the file read again.
Here each tensor's memory goes to the file (and the hash) as it is, in blocks: a synchronous save
copies nothing, an asynchronous one writes from its snapshot, and both the writes and the hashing
release the GIL (a background save leaves the training thread its interpreter).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct

import torch

# safetensors' names for the dtypes a checkpoint holds.
_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}
_BLOCK = 64 << 20  # bytes per write and hash update: large for the disk, small next to a shard


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's (or a folder's entries') data to the disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_safetensors(
    path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str]
) -> tuple[int, str]:
    """Write contiguous CPU `tensors` to `path` in the safetensors format and flush the file to
    disk; returns (bytes written, their SHA-256 in hex)."""
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for name, tensor in tensors.items():
        if tensor.device.type != "cpu" or not tensor.is_contiguous():
            raise ValueError(f"tensor {name!r} must be a contiguous CPU tensor to be written")
        if tensor.dtype not in _DTYPES:
            raise ValueError(f"tensor {name!r} has dtype {tensor.dtype}, which a checkpoint file cannot hold")
        size = tensor.numel() * tensor.element_size()
        header[name] = {
            "dtype": _DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    digest = hashlib.sha256()
    written = 0
    with open(path, "wb") as file:
        for block in (struct.pack("<Q", len(encoded)), encoded):
            file.write(block)
            digest.update(block)
            written += len(block)
        for tensor in tensors.values():
            if tensor.numel() == 0:
                continue
            data = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
            for begin in range(0, len(data), _BLOCK):
                block = data[begin : begin + _BLOCK]
                file.write(block)
                digest.update(block)
                written += len(block)
    fsync_path(path)
    return written, digest.hexdigest()
