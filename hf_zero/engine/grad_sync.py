"""Gradient reduction: how each parameter's gradient reaches the rank that owns its elements.

Every parameter has a post-accumulate-grad hook that hands its gradient to a reducer and drops
`param.grad`. The engine tells the reducer where backward passes end (`end_backward`): after
`engine.backward`, at the model's next forward when gradients arrived since, at `zero_grad` and
at the step.

Precision: within one backward pass gradients add up in the compute dtype (as autograd itself
adds up a shared weight's gradients); across the micro-batches of a step they add up in fp32 at
every stage. A step with one micro-batch keeps no fp32 gradient: the optimizer reads the 16-bit
gradient directly. The first time a step accumulates, the reducer switches to an fp32 buffer and
keeps it. The 1/world average is not applied here: the optimizer folds it into its gradient scale,
or under fp16 the engine's backward divides the loss by the world size (so the sum is the mean).

- `StepReduction` (stages 0 and 1, and any stage in a world of one): gradients add up in a
  full-size buffer; at the step it is all-reduced (stage 0) or reduce-scattered bucket by bucket
  in place (stage 1).
- `BackwardReduceScatter` (stage 2): gradients are staged per bucket and each bucket is
  reduce-scattered into this rank's shard during backward. Collectives pair up across ranks by
  call order, so every rank launches every bucket exactly once per backward pass, in one
  canonical order, whatever parameters its data used (a bucket nothing reached is sent as
  zeros; a ready bucket waits for its predecessors).
- `UnitReduceScatter` (stage 3): the same staging, but a unit's buckets are launched when the
  backward walk of the stage-3 gatherer ends that unit, so the reduce-scatters interleave with the
  gathers identically on every rank (`rules_of_order.py`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..core.arena import carve_ordered, nbytes, segment_order
from ..core.distributed import Collectives
from ..core.flat_group import FlatParamGroup
from ..core.layout import Run, Span


class GradientReducer:
    """Bookkeeping shared by both reducers; see the module docstring for the protocol."""

    def __init__(
        self, groups: Sequence[FlatParamGroup], comm: Collectives, reduce_fp32: bool = False
    ) -> None:
        self.groups = groups
        self.comm = comm
        # What reduce-scatters the gradient buckets at stages 2-3: `comm`, or ZeRO++'s int8
        # hierarchical reduction (`zeropp.py`).
        self.scatter_comm: Any = comm
        # ZeroConfig.reduce_dtype="fp32": gradients are summed (within a pass and over ranks) in fp32.
        self.reduce_fp32 = reduce_fp32
        self.grads: list[torch.Tensor] = []
        self.dirty = [False] * len(groups)  # holds values the next step must not see
        self.accumulating = False  # fp32 accumulation across micro-batches; kept once switched on
        self.backwards = 0  # backward passes ended since the last step
        self.pending = False  # gradients arrived since the last end of a backward pass
        self.closed_by: str | None = None  # what reduced this step's gradients early (clipping)

    def reduce_dtype(self, group: FlatParamGroup) -> torch.dtype:
        """The dtype `group`'s gradients are summed and reduced in."""
        return torch.float32 if self.reduce_fp32 else group.compute_dtype

    def _check_open(self) -> None:
        if self.closed_by is not None:
            raise RuntimeError(
                f"this step's gradients were already reduced (by {self.closed_by}), so no further backward pass "
                "can add to them; call step() or zero_grad() first"
            )

    def _start_accumulating(self) -> None:
        """A second micro-batch is coming into this step: accumulate in fp32 from now on."""
        self.grads = self._in_fp32(self.grads)
        self.accumulating = True
        self.dirty = [True] * len(self.grads)

    def _buffer_numel(self, group: FlatParamGroup) -> int:
        """Elements of `group`'s gradient buffer."""
        raise NotImplementedError

    def _carve_grads(self, dtypes: Sequence[torch.dtype]) -> list[torch.Tensor]:
        """Zeroed gradient buffers, one allocation per dtype, in the masters' order (`arena.py`):
        where they are whole shards (stages 2-3, or a world of one), the statistics and the
        optimizer step read each param group in one launch."""
        return carve_ordered(
            [self._buffer_numel(g) for g in self.groups],
            dtypes,
            [segment_order(g.optimizer_group, g.compute_dtype) for g in self.groups],
            self.groups[0].flat.device if self.groups else torch.device("cpu"),
        )

    def _in_fp32(self, buffers: list[torch.Tensor]) -> list[torch.Tensor]:
        fp32 = self._carve_grads([torch.float32] * len(buffers))
        for new, old in zip(fp32, buffers, strict=True):
            new.copy_(old)
        return fp32

    def persistent_bytes(self) -> int:
        """Bytes of the gradient buffers kept between steps."""
        return sum(nbytes(buffer) for buffer in self.grads)

    def clear_after_step(self, zeroed_by_kernel: set[int]) -> None:
        """Get ready for the next step's gradients (groups in `zeroed_by_kernel` were zeroed already)."""
        for index, buffer in enumerate(self.grads):
            if self.dirty[index] and index not in zeroed_by_kernel:
                buffer.zero_()
            self.dirty[index] = False
        self.backwards = 0
        self.closed_by = None


class StepReduction(GradientReducer):
    """Stages 0 and 1 (and a world of one): accumulate whole gradients, reduce once per step."""

    def __init__(
        self, groups: Sequence[FlatParamGroup], comm: Collectives, scatter: bool, reduce_fp32: bool = False
    ) -> None:
        super().__init__(groups, comm, reduce_fp32)
        self.scatter = scatter and comm.world_size > 1
        self.grads = self._carve_grads([self.reduce_dtype(g) for g in groups])

    def _buffer_numel(self, group: FlatParamGroup) -> int:
        return group.layout.numel  # the whole gradient

    def on_grad(self, group: int, index: int, grad: torch.Tensor) -> None:
        self._check_open()
        if self.backwards and not self.accumulating:
            self._start_accumulating()
        self.groups[group].layout.param_view(self.grads[group], index).add_(grad)
        self.dirty[group] = True
        self.pending = True

    def end_backward(self, force: bool = False) -> None:
        if self.pending or force:
            self.backwards += 1
            self.pending = False

    def reduce(self) -> None:
        """Sum the gradients over ranks (this rank's chunks only, for stage 1)."""
        self.end_backward()
        if self.comm.world_size == 1:
            return
        if self.scatter:
            # Every bucket of every segment in one collective (per dtype).
            works = self.comm.reduce_scatter_many(
                [
                    (
                        buffer[
                            bucket.chunk_start(group.rank) : bucket.chunk_start(group.rank) + bucket.chunk
                        ],
                        group.layout.bucket_view(buffer, bucket),
                    )
                    for group, buffer in zip(self.groups, self.grads, strict=True)
                    for bucket in group.layout.buckets
                ]
            )
        else:
            works = [self.comm.all_reduce(buffer, async_op=True) for buffer in self.grads]
        self.dirty = [True] * len(self.grads)
        for work in works:
            work.wait()

    def run_grad(self, group: int, run: Run) -> torch.Tensor:
        """The reduced (summed, not averaged) gradient of the elements of `run`."""
        return self.grads[group][run.flat_start : run.flat_start + run.length]

    def span_grad(self, group: int, span: Span) -> torch.Tensor:
        return self.grads[group][span.flat_begin : span.flat_begin + span.length]

    def owned_grads(self, group: int) -> list[torch.Tensor]:
        """Tensors that together hold exactly this rank's reduced gradient elements."""
        return [self.run_grad(group, run) for run in self.groups[group].runs]

    def kernel_zeroes(self, group: int) -> bool:
        """Whether the optimizer kernel, reading this group's gradient, should zero it on the way:
        only where its runs cover the whole buffer (stage 1 leaves other ranks' chunks behind)."""
        return self.groups[group].layout.num_shards == 1

    def discard(self) -> None:
        """Drop what was accumulated since the last step (nothing is in flight between collectives)."""
        self.pending = False
        self.clear_after_step(set())


class _BucketState:
    __slots__ = ("last_fired", "launched", "remaining", "staging")

    def __init__(self) -> None:
        self.staging: torch.Tensor | None = None
        self.remaining = 0  # distinct parameters still to receive their gradient(s) this pass
        self.launched = False
        self.last_fired = -1  # when its last gradient arrived in the calibration pass


class BackwardReduceScatter(GradientReducer):
    """Stage 2: reduce-scatter gradient buckets during backward, in one canonical order.

    A bucket is ready when each of its parameters has received as many gradients as expected
    (a layer reused under reentrant activation checkpointing fires its hook once per use). The
    first pass expects one each and launches buckets in a static order (reverse registration); a
    gradient that arrives after its bucket went is kept aside, and at the end of that pass the
    ranks agree, in one small collective, on how often each hook fires, on rank 0's order of
    filling buckets, and on which buckets need a second round for such late gradients. Later
    passes wait for the learned counts. With `overlap=False` nothing is reduced before a backward
    pass ends. At most two reductions are outstanding during backward, which bounds staging memory.
    """

    def __init__(
        self,
        groups: Sequence[FlatParamGroup],
        comm: Collectives,
        overlap: bool,
        positions: Sequence[Sequence[int]],
        reduce_fp32: bool = False,
    ) -> None:
        super().__init__(groups, comm, reduce_fp32)
        self.overlap = overlap
        self.max_in_flight = 2
        self.grads = self._carve_grads([self.reduce_dtype(g) for g in groups])
        self.buckets = [(g, bucket) for g, group in enumerate(groups) for bucket in group.layout.buckets]
        self.bucket_of: list[list[int]] = [[0] * len(group.params) for group in groups]
        earliest_use = []
        for k, (g, bucket) in enumerate(self.buckets):
            for slot in bucket.slots:
                self.bucket_of[g][slot] = k
            earliest_use.append(min(positions[g][slot] for slot in bucket.slots))
        # Until the first pass shows the real order: a bucket fills when its first-registered
        # parameter's gradient arrives, and backward visits parameters roughly in reverse.
        self.order = sorted(range(len(self.buckets)), key=lambda k: (-earliest_use[k], k))
        self.calibrated = not overlap  # nothing launches early without overlap: nothing to learn
        self.expected = [[1] * len(group.params) for group in groups]
        self.states = [_BucketState() for _ in self.buckets]
        self.late: dict[int, torch.Tensor] = {}  # first pass: gradients that came after their bucket
        self.order_agreed = True  # the static order is the same on every rank
        self.in_flight: deque = deque()
        # Full-gradient staging alive now, and the most ever (elements and bytes): the bound stage 2
        # promises.
        self.staged_elements = self.staged_bytes = 0
        self.peak_staged_elements = self.peak_staged_bytes = 0
        self._reset_pass()

    def _buffer_numel(self, group: FlatParamGroup) -> int:
        return group.layout.shard_numel  # this rank's reduced shard

    def order_by_first_use(self, first_use: dict[tuple[int, int], int]) -> None:
        """Before the first backward pass: propose launching buckets in reverse order of their
        parameters' first use in the first forward, which is the order backward fills them (a
        bucket fills when its earliest-used parameter's gradient arrives; parameters not seen go
        last). Each rank saw only what its own data used, so rank 0's proposal is broadcast before
        the first launch (`_agree_on_order`)."""
        if self.calibrated or self.cursor:
            return
        earliest = [min(first_use.get((g, slot), -1) for slot in bucket.slots) for g, bucket in self.buckets]
        self.order = sorted(range(len(self.buckets)), key=lambda k: (-earliest[k], k))
        self.order_agreed = False

    def _agree_on_order(self) -> None:
        """Adopt rank 0's launch order. Issued right before a rank's first launch, it is every
        rank's first collective of the pass, so it pairs up however far each backward has got."""
        order = torch.tensor(self.order, dtype=torch.int64, device=self._device)
        self.comm.broadcast(order)
        self.order = order.tolist()
        self.order_agreed = True

    @property
    def _device(self) -> torch.device:
        return self.grads[0].device if self.grads else torch.device("cpu")

    def _reset_pass(self) -> None:
        self.fired = [[0] * len(group.params) for group in self.groups]
        for state, (_, bucket) in zip(self.states, self.buckets, strict=True):
            state.remaining = len(bucket.slots)
            state.launched = False
            state.last_fired = -1
        self.cursor = 0  # position in `order` of the next bucket to launch
        self.sequence = 0

    def on_grad(self, group: int, index: int, grad: torch.Tensor) -> None:
        self._check_open()
        k = self.bucket_of[group][index]
        state = self.states[k]
        bucket = self.buckets[k][1]
        if state.launched:
            if self.calibrated:
                raise self._late_gradient_error(group, index)
            if k not in self.late:
                self.late[k] = self._staging_buffer(group, bucket.size)
            target = self.late[k]
        else:
            if state.staging is None:
                state.staging = self._staging_buffer(group, bucket.size)
            target = state.staging
        slot = self.groups[group].layout.slots[index]
        begin = slot.offset - bucket.start
        target[begin : begin + slot.numel].view(slot.shape).add_(grad)
        self.pending = True
        fired = self.fired[group][index] = self.fired[group][index] + 1
        if not self.calibrated:
            state.last_fired = self.sequence
            self.sequence += 1
        if self.overlap and fired == self.expected[group][index]:
            state.remaining -= 1
            if state.remaining == 0:
                if not self.order_agreed:
                    self._agree_on_order()
                while self.cursor < len(self.order) and self.states[self.order[self.cursor]].remaining == 0:
                    self._launch([self.order[self.cursor]])

    def _staging_buffer(self, group: int, size: int) -> torch.Tensor:
        dtype = self.reduce_dtype(self.groups[group])
        self.staged_elements += size
        self.staged_bytes += size * dtype.itemsize
        self.peak_staged_elements = max(self.peak_staged_elements, self.staged_elements)
        self.peak_staged_bytes = max(self.peak_staged_bytes, self.staged_bytes)
        return self.groups[group].ops.scratch(size, dtype)

    def _launch(self, ks: Sequence[int]) -> None:
        """Reduce-scatter buckets `ks` (the next ones in canonical order) into this rank's shard,
        as one collective."""
        stagings = []
        for k in ks:
            state = self.states[k]
            g, bucket = self.buckets[k]
            stagings.append(
                state.staging if state.staging is not None else self._staging_buffer(g, bucket.size)
            )
            state.staging = None
            state.launched = True
        self.cursor += len(ks)
        self._reduce_scatter(ks, stagings, add=False)

    def _next_launch(self) -> list[int]:
        """The buckets the next launch sends: one at a time, as they fill."""
        return [self.order[self.cursor]]

    def _reduce_scatter(self, ks: Sequence[int], stagings: Sequence[torch.Tensor], add: bool) -> None:
        if self.backwards and not self.accumulating:
            self._start_accumulating()
        pairs, landings = [], []
        for k, staging in zip(ks, stagings, strict=True):
            g, bucket = self.buckets[k]
            target = self.grads[g][bucket.shard_offset : bucket.shard_offset + bucket.chunk]
            # The first micro-batch of a step lands in the shard; later ones land beside it and add in.
            out = (
                self.groups[g].ops.scratch(bucket.chunk, staging.dtype, zero=False)
                if (self.accumulating or add)
                else target
            )
            pairs.append((out, staging))
            landings.append((out, target, staging, g))  # staging stays alive until it lands
        works = self.scatter_comm.reduce_scatter_many(pairs, unit=self.groups[self.buckets[ks[0]][0]].unit)
        self.in_flight.append((works, landings))
        while len(self.in_flight) > self.max_in_flight:
            self._complete(self.in_flight.popleft())

    def _complete(self, entry) -> None:
        works, landings = entry
        for work in works:
            work.wait()
        for out, target, staging, group in landings:
            ops = self.groups[group].ops
            if out is not target:
                target.add_(out)
                self.dirty[group] = True
                ops.recycle(out)
            ops.recycle(staging)
            self.staged_elements -= staging.numel()
            self.staged_bytes -= staging.numel() * staging.element_size()

    def end_backward(self, force: bool = False) -> None:
        """Launch every bucket not launched yet, in order, and wait for all of them."""
        if not (self.pending or self.cursor or force):
            return
        if not self.order_agreed:
            self._agree_on_order()
        while self.cursor < len(self.order):
            self._launch(self._next_launch())
        if not self.calibrated:
            self._calibrate()
        while self.in_flight:
            self._complete(self.in_flight.popleft())
        self._reset_pass()
        self.backwards += 1
        self.pending = False

    def _calibrate(self) -> None:
        """After the first pass: agree on how often each parameter's hook fires per pass, on the
        launch order, and reduce the gradients that came after their bucket (on any rank)."""
        fired = [c for counts in self.fired for c in counts]
        late = [int(k in self.late) for k in range(len(self.buckets))]
        agreed = torch.tensor(fired + late, dtype=torch.int64, device=self._device)
        self.comm.all_reduce(agreed, op=dist.ReduceOp.MAX)
        agreed_list = agreed.tolist()
        start = 0
        for g, counts in enumerate(self.fired):
            self.expected[g] = [max(1, c) for c in agreed_list[start : start + len(counts)]]
            start += len(counts)
        for k in self.order:
            if agreed_list[start + k]:
                late_staging = self.late.pop(k, None)
                if late_staging is None:
                    late_staging = self._staging_buffer(self.buckets[k][0], self.buckets[k][1].size)
                self._reduce_scatter([k], [late_staging], add=True)
        filled = sorted(
            (k for k in self.order if self.states[k].last_fired >= 0), key=lambda k: self.states[k].last_fired
        )
        never = [k for k in self.order if self.states[k].last_fired < 0]
        order = torch.tensor(filled + never, dtype=torch.int64, device=self._device)
        self.comm.broadcast(order)
        self.order = order.tolist()
        self.calibrated = True

    def _late_gradient_error(self, group: int, index: int) -> RuntimeError:
        name = self.groups[group].layout.slots[index].name
        return RuntimeError(
            f"parameter {name} received a gradient after its bucket was already reduced in this backward "
            f"pass (its gradient hook ran {self.fired[group][index] + 1} times so far; the first backward "
            f"pass ran it {self.expected[group][index]} times). hf_zero reduces a bucket once each of its "
            "parameters has received as many gradients as in the first pass. For a model that reuses "
            "parameters a varying number of times per pass, set ZeroConfig(overlap_comm=False) to reduce "
            "after each backward pass; for two backward passes without a forward between them, call "
            "engine.backward(loss) (or accelerator.backward) for each"
        )

    def reduce(self) -> None:
        """Gradients were reduced during backward; make sure the last ones have landed."""
        self.end_backward()
        if self.backwards == 0 and not self.accumulating:
            # No backward since the last step: the 16-bit shard still holds the last step's gradient.
            for buffer in self.grads:
                buffer.zero_()

    def run_grad(self, group: int, run: Run) -> torch.Tensor:
        return self.grads[group][run.shard_start : run.shard_start + run.length]

    def span_grad(self, group: int, span: Span) -> torch.Tensor:
        return self.grads[group][span.shard_begin : span.shard_begin + span.length]

    def owned_grads(self, group: int) -> list[torch.Tensor]:
        return [self.grads[group]]

    def kernel_zeroes(self, group: int) -> bool:
        """The fp32 accumulator must start each step at zero; the 16-bit shard is simply overwritten
        by the next pass's reduce-scatters."""
        return self.accumulating

    def discard(self) -> None:
        """Drop this step's gradients. A pass with buckets still to send finishes sending them
        first: every rank joined those collectives."""
        self.end_backward()
        self.clear_after_step(set())


class UnitReduceScatter(BackwardReduceScatter):
    """Stage 3: reduce-scatter a unit's buckets when its backward ends (`end_unit`), in the
    backward walk's order (layer units in reverse registration order, then the root unit).

    A parameter that got no gradient on this rank contributes zeros at that point, and a unit this
    rank's data skipped is reduced where the walk passes it, so every rank issues the same
    reduce-scatters at the same points between its gathers. Nothing is launched when buckets fill,
    so no first pass has to learn hook counts or a launch order. With `overlap=False` the gatherer
    does not call `end_unit`, and everything is reduced when the pass ends.
    """

    def __init__(
        self,
        groups: Sequence[FlatParamGroup],
        comm: Collectives,
        unit_order: Sequence[int],
        reduce_fp32: bool = False,
    ) -> None:
        positions = [[0] * len(g.params) for g in groups]
        super().__init__(groups, comm, overlap=False, positions=positions, reduce_fp32=reduce_fp32)
        walk_position = {unit: i for i, unit in enumerate(unit_order)}
        self.order = sorted(
            range(len(self.buckets)), key=lambda k: (walk_position[groups[self.buckets[k][0]].unit], k)
        )
        # unit -> the position in `order` just past its last bucket
        self.unit_end: dict[int, int] = {}
        for position, k in enumerate(self.order):
            self.unit_end[groups[self.buckets[k][0]].unit] = position + 1
        self.calibrated = True

    def end_unit(self, unit: int) -> None:
        """The backward walk has ended `unit`: launch its buckets (and any before it in the order)."""
        end = self.unit_end.get(unit, self.cursor)
        while self.cursor < end:
            self._launch(self._next_launch())

    def _next_launch(self) -> list[int]:
        """The buckets the next launch sends: all of the next unit's, as one collective (per dtype)."""
        unit = self.groups[self.buckets[self.order[self.cursor]][0]].unit
        return self.order[self.cursor : self.unit_end[unit]]

    def _late_gradient_error(self, group: int, index: int) -> RuntimeError:
        name = self.groups[group].layout.slots[index].name
        return RuntimeError(
            f"parameter {name} received a gradient after the backward of its unit ended and its gradients "
            "were reduced: its unit ran again after the backward had moved on to units registered before "
            "it. Stage 3 reduces each unit when the backward walk (reverse registration order) leaves it; "
            "register the model's layers in the order they run, name coarser units in "
            "ZeroConfig.unit_classes, or set ZeroConfig(overlap_comm=False) to reduce after each backward pass"
        )


def watch_first_forward(
    module: nn.Module, slot_of: dict[int, tuple[int, int]], reducer: BackwardReduceScatter
) -> list:
    """Record the order in which the first forward uses the managed parameters and hand it
    to the stage-2 reducer, which launches its first backward's buckets in reverse."""
    first_use: dict[tuple[int, int], int] = {}
    handles: list = []

    def record(owned: list[tuple[int, int]]):
        @torch.compiler.disable
        def hook(submodule: nn.Module, args: Any) -> None:
            for key in owned:
                first_use.setdefault(key, len(first_use))

        return hook

    for submodule in module.modules():
        owned = [slot_of[id(p)] for p in submodule.parameters(recurse=False) if id(p) in slot_of]
        if owned:
            handles.append(submodule.register_forward_pre_hook(record(owned)))

    @torch.compiler.disable
    def done(model: nn.Module, args: Any, output: Any) -> None:
        for handle in handles:
            handle.remove()
        reducer.order_by_first_use(first_use)

    handles.append(module.register_forward_hook(done))
    return list(handles)
