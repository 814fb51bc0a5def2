"""CPU optimizer offload's step: each rank's gradient shard streams to the host, and its new 16-bit
weights back, through two page-locked staging buffers of `offload_chunk_size` elements, so host
memory holds the masters and optimizer state plus those two buffers, never a second copy of the
shard's gradient or weights.

`HostStaging.pieces` yields the fused step's pieces (see `fused_step.py`) chunk by chunk: while the
host updates one chunk, the next one's gradient is already on its way down, and the finished
chunk's weights are on their way up.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from ..core.device import DeviceOps, Event
from ..core.flat_group import FlatParamGroup
from ..core.layout import Run


@dataclass
class _Stage:
    """One staging buffer pair and what still uses it on the device."""

    grad: torch.Tensor
    copy: torch.Tensor
    uploaded: Event | None = None  # set while its last chunk's weights are going up

    def wait_until_free(self) -> None:
        if self.uploaded is not None:
            self.uploaded.synchronize()
            self.uploaded = None


class HostStaging:
    """Two staging buffer pairs (gradient, 16-bit copy) for every dtype combination in use."""

    def __init__(self, chunk: int, ops: DeviceOps) -> None:
        self.chunk = chunk
        self.ops = ops
        self._stages: dict[tuple[torch.dtype, torch.dtype], list[_Stage]] = {}

    @property
    def nbytes(self) -> int:
        """Host bytes the staging buffers take."""
        return sum(
            s.grad.untyped_storage().nbytes() + s.copy.untyped_storage().nbytes()
            for stages in self._stages.values()
            for s in stages
        )

    def _pair(self, grad_dtype: torch.dtype, copy_dtype: torch.dtype) -> list[_Stage]:
        key = (grad_dtype, copy_dtype)
        if key not in self._stages:
            self._stages[key] = [
                _Stage(
                    self.ops.host_empty(self.chunk, grad_dtype), self.ops.host_empty(self.chunk, copy_dtype)
                )
                for _ in range(2)
            ]
        return self._stages[key]

    def pieces(
        self, group: FlatParamGroup, run_grad: Callable[[Run], torch.Tensor]
    ) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor | None]]:
        """The pieces of `group`'s shard for the fused step, the gradient in host staging memory and
        the output where the new weights go: a staging buffer uploaded to the device chunk once
        the step moves on, or the shard itself when it lives on the host (`offload_params`)."""
        chunks = self._chunks(group)
        if not chunks:
            return
        grad_dtype = run_grad(group.runs[0]).dtype
        stages = self._pair(grad_dtype, group.compute_dtype)
        downloaded = self._download(group, run_grad, chunks[0], stages[0])
        for index, chunk in enumerate(chunks):
            stage = stages[index % 2]
            if index + 1 < len(chunks):  # the next chunk comes down while this one is updated
                following = self._download(group, run_grad, chunks[index + 1], stages[(index + 1) % 2])
            downloaded.synchronize()
            uploads = []
            for run, begin, end in chunk:
                offset = begin - chunk[0][1]
                target = group.flat_run(run)[begin - run.shard_start : end - run.shard_start]
                # A shard kept on the host (offload_params) takes the weights directly; one on the
                # device gets them through the staging buffer (on the CPU too, so that path runs in CI).
                on_host = group.params_offloaded
                out = target if on_host else stage.copy[offset : offset + end - begin]
                yield begin, end - begin, stage.grad[offset : offset + end - begin], out
                if not on_host:
                    uploads.append((target, out))
            for target, out in uploads:
                target.copy_(out, non_blocking=True)
            stage.uploaded = self.ops.record()
            if index + 1 < len(chunks):
                downloaded = following

    def _chunks(self, group: FlatParamGroup) -> list[list[tuple[Run, int, int]]]:
        """The shard cut into consecutive chunks of at most `chunk` elements, each a list of
        (run, first, end) in shard coordinates."""
        chunks: list[list[tuple[Run, int, int]]] = []
        current: list[tuple[Run, int, int]] = []
        first = 0
        for run in group.runs:
            begin, end = run.shard_start, run.shard_start + run.length
            while begin < end:
                if current and begin >= first + self.chunk:  # past the chunk (padding between runs)
                    chunks.append(current)
                    current = []
                if not current:
                    first = begin
                stop = min(end, first + self.chunk)
                current.append((run, begin, stop))
                begin = stop
        if current:
            chunks.append(current)
        return chunks

    def _download(
        self, group: FlatParamGroup, run_grad: Callable[[Run], torch.Tensor], chunk: list, stage: _Stage
    ) -> Event:
        stage.wait_until_free()  # its previous chunk's weights have left for the device
        first = chunk[0][1]
        for run, begin, end in chunk:
            source = run_grad(run)[begin - run.shard_start : end - run.shard_start]
            stage.grad[begin - first : end - first].copy_(source, non_blocking=True)
        return self.ops.record()
