"""Where a flat segment's step-time pieces live when the optimizer is offloaded: the host buffers
of CPU offload's whole-shard routes (the delayed update, optimizers on torch's own path, the NVMe
swap's buffers), and the copies between them and the device.

`HostPlacement` is a part of `FlatParamGroup` (a mixin): the segment supplies `layout`, `runs`,
`ops`, `compute_dtype`, `offload`, `offload_params` and `flat_run`; its storage (the 16-bit
buffer, the shards and the master) stays in `flat_group.py`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .layout import Run


class HostPlacement:
    """The host side of an offloaded segment."""

    host_grad: torch.Tensor | None  # the shard's gradient in fp32, on the host
    host_copy: torch.Tensor | None  # the shard's updated weights in the compute dtype, on the host

    @property
    def offloaded(self) -> bool:
        """Whether the master (and the optimizer state made from it) lives off the device."""
        return self.offload != "none"

    @property
    def params_offloaded(self) -> bool:
        """Whether this rank's 16-bit shard (stage 3) lives off the device."""
        return self.offload_params != "none"

    def ensure_host_buffers(self) -> None:
        """CPU offload, where the step needs the whole shard on the host at once (the delayed
        update, optimizers on torch's own path): allocate `host_grad` and `host_copy` once."""
        if self.host_grad is None:
            numel = self.layout.shard_numel
            self.host_grad = self.ops.host_zeros(numel, torch.float32)
            self.host_copy = self.ops.host_zeros(numel, self.compute_dtype)

    def download_grads(self, run_grad: Callable[[Run], torch.Tensor]) -> None:
        """Offload: copy this rank's reduced gradient (`run_grad(run)`, on the device) into
        `host_grad`, without waiting; the caller synchronises before reading it."""
        for run in self.runs:
            self.host_grad[run.shard_start : run.shard_start + run.length].copy_(
                run_grad(run), non_blocking=True
            )

    def host_pieces(self) -> list[tuple[int, int, torch.Tensor, torch.Tensor]]:
        """Offload: the fused step's pieces over the host buffers: gradient in, 16-bit copy out."""
        return [
            (
                run.shard_start,
                run.length,
                self.host_grad[run.shard_start : run.shard_start + run.length],
                self.host_copy[run.shard_start : run.shard_start + run.length],
            )
            for run in self.runs
        ]

    def upload_weights(self) -> None:
        """Offload: copy the updated weights from `host_copy` into this rank's chunks on the device,
        without waiting (the next step's download waits for the stream first)."""
        for run in self.runs:
            self.flat_run(run).copy_(
                self.host_copy[run.shard_start : run.shard_start + run.length], non_blocking=True
            )
