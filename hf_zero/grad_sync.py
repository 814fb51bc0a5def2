"""Gradient reduction: how each parameter's gradient reaches the owning rank's fp32 shard.

Every parameter gets a post-accumulate-grad hook that hands its gradient to one of these and
drops `param.grad`, so no gradient outlives the hook in the model itself.

- `StepTimeReduction` (stages 0 and 1): gradients add up in a full-size flat buffer in the
  compute dtype; at the step it is all-reduced (stage 0) or reduce-scattered bucket by bucket
  (stage 1).
- `BucketedReduceScatter` (stage 2): gradients are staged per bucket; a bucket is
  reduce-scattered as soon as all its gradients have arrived (asynchronously, so it overlaps the
  rest of backward) and its chunk is added into the fp32 shard. Only a few buckets' worth of
  full gradients exist at any time.

Both average over ranks, so the result matches one process training on the global batch.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import torch

from .distributed import Collectives
from .flat_group import FlatParamGroup


class StepTimeReduction:
    """Stages 0 and 1: accumulate whole gradients, reduce them once per optimizer step."""

    def __init__(self, groups: Sequence[FlatParamGroup], comm: Collectives, scatter: bool) -> None:
        self.groups = groups
        self.comm = comm
        self.scatter = scatter

    def on_grad(self, group: FlatParamGroup, index: int, grad: torch.Tensor) -> None:
        group.layout.param_view(group.flat_grad, index).add_(grad)

    def finish_backward(self) -> None:
        """Nothing is in flight between backward passes."""

    def reduce(self) -> None:
        """Leave the rank-averaged gradient of each group's shard in `grad_shard`."""
        if self.scatter and self.comm.world_size > 1:
            self._reduce_scatter_buckets()
        else:
            # Stage 0, or a world of one (where the only shard is everything): all-reduce, then
            # convert to fp32 in the same pass as the copy.
            works = [self.comm.all_reduce(group.flat_grad, async_op=True) for group in self.groups]
            for work, group in zip(works, self.groups, strict=True):
                work.wait()
                if group.grad_shard is not group.flat_grad:
                    group.grad_shard.copy_(group.flat_grad)
        if self.comm.world_size > 1:
            for group in self.groups:
                group.grad_shard.mul_(1.0 / self.comm.world_size)

    def _reduce_scatter_buckets(self) -> None:
        pending = []
        for group in self.groups:
            for bucket in group.layout.buckets:
                target = group.layout.shard_chunk(group.grad_shard, bucket)
                same_dtype = target.dtype == group.compute_dtype
                out = target if same_dtype else torch.empty_like(target, dtype=group.compute_dtype)
                source = group.layout.bucket_view(group.flat_grad, bucket)
                pending.append((self.comm.reduce_scatter(out, source, async_op=True), out, target))
        for work, out, target in pending:
            work.wait()
            if out is not target:
                target.copy_(out)

    def discard(self) -> None:
        """Nothing is in flight; the groups' buffers are cleared by the engine."""


class _Staging:
    __slots__ = ("arrived", "buffer")

    def __init__(self) -> None:
        self.buffer: torch.Tensor | None = None
        self.arrived = 0


class BucketedReduceScatter:
    """Stage 2: reduce-scatter gradient buckets during backward and accumulate the owned chunk.

    Buckets are launched in the order they fill up, which is the same on every rank because every
    rank runs the same backward graph. Gradients that never arrive (unused parameters) count as
    zero when `finish_backward` flushes the partly filled buckets. At most `max_in_flight`
    reductions are outstanding before the oldest is waited for, which bounds staging memory.
    """

    def __init__(self, groups: Sequence[FlatParamGroup], comm: Collectives, max_in_flight: int) -> None:
        self.groups = groups
        self.comm = comm
        self.max_in_flight = max_in_flight
        self.scale = 1.0 / comm.world_size
        self.staging = {
            (g, b.index): _Staging() for g in range(len(groups)) for b in groups[g].layout.buckets
        }
        self.group_index = {id(group): g for g, group in enumerate(groups)}
        self.in_flight: deque = deque()
        # Elements of full-gradient staging alive now, and the most ever: the bound stage 2 promises.
        self.staged_elements = 0
        self.peak_staged_elements = 0

    def on_grad(self, group: FlatParamGroup, index: int, grad: torch.Tensor) -> None:
        layout = group.layout
        slot = layout.slots[index]
        if self.comm.world_size == 1:
            # One rank owns every chunk: add straight into the fp32 shard, no staging copy.
            layout.param_view(group.grad_shard, index).add_(grad)
            return
        bucket = layout.buckets[slot.bucket]
        staging = self.staging[(self.group_index[id(group)], bucket.index)]
        if staging.buffer is None:
            staging.buffer = torch.zeros(bucket.size, dtype=group.compute_dtype, device=grad.device)
            self.staged_elements += bucket.size
            self.peak_staged_elements = max(self.peak_staged_elements, self.staged_elements)
        begin = slot.offset - bucket.start
        staging.buffer[begin : begin + slot.numel].view(slot.shape).add_(grad)
        staging.arrived += 1
        if staging.arrived >= len(bucket.slots):
            self._launch(group, bucket, staging)

    def _launch(self, group: FlatParamGroup, bucket, staging: _Staging) -> None:
        out = torch.empty(bucket.chunk, dtype=group.compute_dtype, device=staging.buffer.device)
        work = self.comm.reduce_scatter(out, staging.buffer, async_op=True)
        # The staging buffer stays referenced until its reduction has finished.
        self.in_flight.append((work, out, staging.buffer, group, bucket))
        staging.buffer, staging.arrived = None, 0
        while len(self.in_flight) > self.max_in_flight:
            self._complete(self.in_flight.popleft())

    def _complete(self, entry) -> None:
        work, out, _buffer, group, bucket = entry
        work.wait()
        group.layout.shard_chunk(group.grad_shard, bucket).add_(out, alpha=self.scale)
        self.staged_elements -= bucket.size

    def finish_backward(self) -> None:
        """Reduce partly filled buckets and wait for every reduction."""
        for (g, b), staging in self.staging.items():
            if staging.buffer is not None:
                self._launch(self.groups[g], self.groups[g].layout.buckets[b], staging)
        while self.in_flight:
            self._complete(self.in_flight.popleft())

    def reduce(self) -> None:
        """Gradients were reduced during backward; make sure the last ones have landed."""
        self.finish_backward()

    def discard(self) -> None:
        """Drop staged gradients; reductions already launched are completed (every rank joined them)."""
        while self.in_flight:
            self._complete(self.in_flight.popleft())
        for staging in self.staging.values():
            staging.buffer, staging.arrived = None, 0
        self.staged_elements = 0
