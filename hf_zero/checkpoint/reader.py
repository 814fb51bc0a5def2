"""Reading any run of elements of any checkpointed tensor, whatever ranks hold its pieces.

A tensor's elements are spread over rank files as the manifest's spans say. `SpanReader.read`
reads just the bytes of the elements asked for (positioned reads into the files, no mmap of whole
files), so a loader on a new world size reads only what its own shard needs, and a merge holds
one tensor at a time.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..hub.pending import RangeReader
from ..hub.weights import TensorEntry, read_header
from .format import CheckpointError, dtype_of, rank_file_name, state_key


class SpanReader:
    """Reads elements of checkpointed tensors (`read`) from the rank files of one checkpoint."""

    def __init__(self, folder: str | os.PathLike, manifest: dict[str, Any]) -> None:
        self.folder = Path(folder)
        self.manifest = manifest
        self.world_size = manifest["world_size"]
        self.records: dict[str, dict[str, Any]] = {}
        for record in manifest["tensors"]:
            for name in [record["name"], *record.get("aliases", [])]:
                self.records[name] = record
        self._headers: dict[int, dict[str, TensorEntry]] = {}
        self._ranges = RangeReader()

    @property
    def bytes_read(self) -> int:
        return self._ranges.bytes_read

    def _entry(self, rank: int, key: str) -> TensorEntry:
        header = self._headers.get(rank)
        if header is None:
            path = self.folder / rank_file_name(rank, self.world_size)
            try:
                header = self._headers[rank] = read_header(path)
            except ValueError as error:
                raise CheckpointError(f"{error}; resume from another checkpoint") from error
        entry = header.get(key)
        if entry is None:
            raise CheckpointError(
                f"{self.folder / rank_file_name(rank, self.world_size)} has no tensor {key!r}, which the "
                "manifest places there: the file does not belong to this manifest"
            )
        return entry

    def read(self, record: dict[str, Any], key: str, begin: int, length: int) -> torch.Tensor:
        """Elements `begin .. begin + length` of the flattened tensor `record` describes (`key`: ""
        for its values, else an optimizer state), on the CPU in the dtype they were saved in."""
        if length == 0:
            return torch.empty(0, dtype=self.saved_dtype(record, key))
        pieces = []
        end = begin + length
        for rank, span_begin, span_length in record["spans"]:
            lo, hi = max(begin, span_begin), min(end, span_begin + span_length)
            if lo < hi:
                entry = self._entry(rank, state_key(record["name"], key))
                if entry.numel != span_length:
                    raise CheckpointError(
                        f"{entry.file} holds {entry.numel} elements under {entry.key!r} but the manifest "
                        f"records a span of {span_length}: the file does not belong to this manifest"
                    )
                pieces.append((lo, self._ranges.read(entry, lo - span_begin, hi - lo)))
        pieces.sort(key=lambda piece: piece[0])
        covered = sum(piece.numel() for _, piece in pieces)
        if covered != length:
            raise CheckpointError(
                f"the manifest's spans of {record['name']!r} do not cover elements {begin}..{end}: the "
                "manifest is damaged"
            )
        if len(pieces) == 1:
            return pieces[0][1]
        return torch.cat([piece for _, piece in pieces])

    def read_entry(self, rank: int, key: str) -> torch.Tensor:
        """All elements of tensor `key` of rank `rank`'s file, flat, in the dtype they were saved in."""
        entry = self._entry(rank, key)
        return self._ranges.read(entry, 0, entry.numel)

    def read_whole(self, record: dict[str, Any], key: str = "") -> torch.Tensor:
        """The complete tensor `record` describes, shaped as it was saved."""
        shape = torch.Size(record["shape"])
        return self.read(record, key, 0, shape.numel()).view(shape)

    def saved_dtype(self, record: dict[str, Any], key: str = "") -> torch.dtype:
        """The dtype the values (or state `key`) of `record` were written in."""
        if key:
            return dtype_of(record["state"][key])
        return dtype_of(record["stored_dtype"])

    def close(self) -> None:
        self._ranges.close()
