"""Writing a sharded model's full weights as a `save_pretrained` folder, one unit at a time.

Gathering the whole model onto the writing rank's host first would need the full fp32 weights in
host memory at once. Instead each unit's weights are gathered (every rank takes part, unit after
unit in the same order), added to the output file being filled, and dropped once that file is
written; a file is closed when the next tensor would take it past `max_shard_size`. So the
writing rank holds at most one unit's weights plus one output file's worth at a time.

The folder has the layout `save_pretrained` writes: `model.safetensors`, or numbered
`model-0000i-of-0000n.safetensors` files with a `model.safetensors.index.json`; a tensor shared
under several names (tied embeddings) is written once, under its first name. Weight files appear
complete or not at all (written under temporary names, renamed at the end), and weight files of an
earlier save into the same folder that this save did not write are removed.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file
from transformers.utils.hub import convert_file_size_to_int

if TYPE_CHECKING:
    from ..core.engine_view import EngineView

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_WEIGHT_FILE = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?")


class WeightFileWriter:
    """Fills `save_pretrained` weight files in `folder` up to `max_bytes` each, under temporary
    names, and tracks the host bytes held (`held` is what the caller has read or gathered but not
    yet handed over). `finish` names the files, writes the index and removes stale weight files."""

    def __init__(self, folder: Path, max_bytes: int) -> None:
        self.folder = folder
        self.max_bytes = max_bytes
        self.tag = uuid.uuid4().hex[:8]
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.files: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0
        self.total_numel = 0
        self.peak_host_bytes = 0

    def add(self, name: str, tensor: torch.Tensor, held: int = 0) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self.flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += size
        self.total_bytes += size
        self.total_numel += tensor.numel()
        self.peak_host_bytes = max(self.peak_host_bytes, self.pending_bytes + held)

    def flush(self) -> None:
        if not self.pending:
            return
        path = self.folder / f".hf_zero-partial-{self.tag}-{len(self.files):05d}.safetensors"
        save_file(self.pending, str(path), metadata={"format": "pt"})
        self.files.append((path, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> None:
        """Name the files as `save_pretrained` does, write the index, drop stale weight files."""
        self.flush()
        count = len(self.files)
        names = (
            [SINGLE_FILE]
            if count == 1
            else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        )
        for stale in self.folder.iterdir():
            if _WEIGHT_FILE.fullmatch(stale.name) and stale.name not in names:
                stale.unlink()
        for (path, _), name in zip(self.files, names, strict=True):
            os.replace(path, self.folder / name)
        if count > 1:
            index = {
                "metadata": {"total_parameters": self.total_numel, "total_size": self.total_bytes},
                "weight_map": {
                    key: name for (_, keys), name in zip(self.files, names, strict=True) for key in keys
                },
            }
            partial = self.folder / f".hf_zero-partial-{self.tag}-index.json"
            partial.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
            os.replace(partial, self.folder / INDEX_FILE)


def save_full_weights(
    engine: EngineView, output_dir: str | os.PathLike, keep: bool = True, max_shard_size: int | str = "5GB"
) -> dict[str, Any]:
    """Write the model's complete weights (fp32 masters for trained weights, in the dtype the model
    had when handed to the engine) into `output_dir`, unit by unit; see the module docstring.

    Every rank must call it; only ranks with `keep=True` write (and hold anything on the host).
    Returns, on writing ranks, what was written: `files`, `total_size` and `peak_host_bytes`
    (the most weight bytes this rank held on the host at once).
    """
    max_bytes = convert_file_size_to_int(max_shard_size)  # as save_pretrained reads it
    folder = Path(output_dir)
    writer = None
    if keep:
        folder.mkdir(parents=True, exist_ok=True)
        writer = WeightFileWriter(folder, max_bytes)
    # Each tensor once, under its first name (a tied weight's other names point at it on loading).
    first_name: dict[int, str] = {}
    for name, tensor in engine.module.state_dict(keep_vars=True).items():
        first_name.setdefault(id(tensor), name)
    segments = engine.groups + engine.frozen
    for unit in engine.units:
        gathered: list[tuple[str, torch.Tensor]] = []
        for segment in (s for s in segments if s.unit == unit.index):
            for param, value in engine.gather_segment(segment, keep):
                if id(param) in first_name:
                    gathered.append((first_name.pop(id(param)), value))
        gathered.reverse()
        held = sum(t.numel() * t.element_size() for _, t in gathered)
        while gathered:  # hand each tensor over, so a written file's tensors are freed
            name, value = gathered.pop()
            held -= value.numel() * value.element_size()
            if writer is not None:
                writer.add(name, value, held)
    if writer is None:
        return {}
    # What the engine does not shard (buffers; below stage 3, frozen weights): whole on every rank.
    for name, tensor in engine.module.state_dict(keep_vars=True).items():
        if first_name.get(id(tensor)) == name:
            writer.add(name, engine.host_copy(tensor))
    writer.finish()
    return {
        "files": [p.name for p in sorted(folder.glob("model*.safetensors"))],
        "total_size": writer.total_bytes,
        "peak_host_bytes": writer.peak_host_bytes,
    }


def write_atomically(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Have `write` fill a temporary file beside `path`, then rename it over `path`.

    `path` ends up complete or untouched; the temporary file is removed when `write` fails.
    """
    path = os.fspath(path)
    partial = f"{path}.{uuid.uuid4().hex[:8]}.partial"  # unique: several nodes may share a folder
    try:
        write(partial)
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
