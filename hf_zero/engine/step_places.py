"""Where the optimizer step's pieces live, and when their updates run: one kind of place per engine,
chosen by its offload settings, and `StepState`, what one step found and did.

The step (`OptimizerStep._before_optimizer_step`, `step.py`) takes every segment through one loop
with one body, wherever the segment lives::

    place.read_flags()             # what the host must know before any copy is queued
    for g in place.walk(order):    # each segment, its master and state made resident
        fused update -> place.update; torch's own path -> place.gradient; skipped -> nothing
    place.finish()                 # what must follow the loop

A place decides only where a segment's master, optimizer state, gradient and new weights lie
while it is stepped, and when its update is launched:

- `DevicePlace` (no offload): everything on the device; fused updates are batched and launched
  after the loop, Muon's segments and those stepped by whole parameter stepped after it too.
- `HostPlace` (`offload_optimizer="cpu"`): masters and state in host memory; each fused update runs
  at once on host staging's streamed pieces; torch's path waits once for all its gradients.
- `SwapPlace` (`offload_optimizer="nvme"`): masters and state in the swap file, each segment brought
  into a pool buffer for the body and written back after it; its update runs at once there.
- `DelayedPlace` (`offload_overlap="delayed"`): host memory; the updates go to a background thread
  as one job, which finishes while the next step computes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from ..core.chained_optimizer import owner_of_group
from ..core.device import DeviceOps
from ..core.flat_group import FlatParamGroup
from ..core.layout import Run
from ..offload.host_staging import HostStaging
from ..offload.nvme import NvmeSwapper
from .fused_step import Part, fused_step, supports_fused_step
from .grad_sync import GradientReducer
from .matrix_step import MatrixStep
from .whole_step import WholeParameterStep


@dataclass
class StepState:
    """What this step has found and done so far (a fresh one after each step and `zero_grad`)."""

    grads_reduced: bool = False
    clipped: bool = False
    grad_scale: torch.Tensor | None = None  # the clip coefficient, on the device
    stats: torch.Tensor | None = None  # [sum of squares, non-finite count]: see `_gradient_stats`
    found_inf: torch.Tensor | None = None  # fp16: nonzero when this step overflowed, on the device
    scale: torch.Tensor | None = None  # what the update multiplies the reduced gradient by, on the device
    host_scale: torch.Tensor | None = None  # the same on the host, read for an offloaded update
    skipped_on_host: bool | None = None  # `found_inf` once the host has read it
    zeroed_in_kernel: set[int] = field(default_factory=set)  # segments whose gradient the kernel zeroed
    fused_groups: set[int] = field(default_factory=set)  # segments the fused kernels updated
    undo_if_skipped: list = field(default_factory=list)  # the fused steps' host bookkeeping

    @property
    def skipped(self) -> bool:
        """Whether the host has already read that this step overflowed: it then moves and changes nothing."""
        return bool(self.skipped_on_host)

    def read_skipped(self, ops: DeviceOps) -> bool:
        """Whether this step overflowed (fp16; `found_inf` is set), read on the host once per step."""
        if self.skipped_on_host is None:
            self.skipped_on_host = bool(ops.read(self.found_inf))
        return self.skipped_on_host


@dataclass
class Place:
    """Where segments are stepped; the base walks them in the order given, lets the fused kernels
    update the param groups they cover, and needs nothing read before or done after the loop."""

    optimizer: torch.optim.Optimizer
    groups: list[FlatParamGroup]
    state: StepState
    grad_sync: GradientReducer
    ops: DeviceOps

    def read_flags(self) -> None:
        """Read on the host, before the walk, what the loop needs there."""

    def walk(self, order: Sequence[int]) -> Iterator[int]:
        """The segments to step (indices into `groups`), each resident where its update reads it
        while the loop's body runs."""
        yield from order

    def fuses(self, param_group: dict) -> bool:
        """Whether this param group's update runs hf_zero's fused kernels here."""
        return supports_fused_step(self.optimizer, param_group)

    def update(self, g: int, group: FlatParamGroup, param_group: dict) -> None:
        """Segment `g`'s fused update, over its pieces here (launched now or in `finish`)."""
        raise NotImplementedError

    def gradient(self, g: int, group: FlatParamGroup) -> None:
        """Give segment `g` its scaled gradient for torch's own step (now or in `finish`)."""
        raise NotImplementedError(f"{type(self).__name__} steps with hf_zero's fused kernels only")

    def finish(self) -> None:
        """What must happen once every segment was walked."""

    def _run_grad(self, g: int) -> Callable[[Run], torch.Tensor]:
        return lambda run: self.grad_sync.run_grad(g, run)


@dataclass
class DevicePlace(Place):
    """No offload: masters, state, gradients and new weights all live on the device. Walked in arena
    order, a param group's segments sit end to end, so their fused updates are batched per (param
    group, zero the gradient) and launched after the loop, each batch merged into few launches.
    Muon's segments and those stepped by whole parameter get an assembled gradient and are stepped
    at their owners after the loop, before the fused launches."""

    matrix_step: MatrixStep | None
    whole_step: WholeParameterStep | None
    # (param group, zero the gradient) -> its parts
    batches: dict[tuple[int, bool], list[Part]] = field(default_factory=dict, init=False)
    matrix_grads: dict[int, torch.Tensor] = field(default_factory=dict, init=False)  # Muon's segments
    whole_grads: dict[int, torch.Tensor] = field(default_factory=dict, init=False)  # by whole parameter

    def read_flags(self) -> None:
        """Torch's own update must not see a skipped step's gradients: one read for all groups."""
        torch_path = any(
            not self.fuses(self.optimizer.param_groups[group.optimizer_group]) for group in self.groups
        )
        if torch_path and self.state.found_inf is not None:
            self.state.read_skipped(self.ops)

    def update(self, g: int, group: FlatParamGroup, param_group: dict) -> None:
        zero = self.grad_sync.kernel_zeroes(g)
        pieces = [
            (run.shard_start, run.length, self.grad_sync.run_grad(g, run), group.flat_run(run))
            for run in group.runs
        ]
        self.batches.setdefault((group.optimizer_group, zero), []).append((group.master, pieces))
        if zero:
            self.state.zeroed_in_kernel.add(g)

    def gradient(self, g: int, group: FlatParamGroup) -> None:
        grad = torch.empty_like(group.master.data)
        for run in group.runs:
            grad[run.shard_start : run.shard_start + run.length].copy_(self.grad_sync.run_grad(g, run))
        grad = grad if self.state.scale is None else grad.mul_(self.state.scale)
        if self.matrix_step is not None and g in self.matrix_step.segments:
            self.matrix_grads[g] = grad
        elif self.whole_step is not None and g in self.whole_step.segments:
            self.whole_grads[g] = grad
        else:
            group.master.grad = grad  # the optimizer's own step skips a shard without one

    def finish(self) -> None:
        """Step the segments that need whole parameters, then launch the fused batches (the
        overflow flag stays on the device: a skipped step's kernels change nothing)."""
        for plan, grads in ((self.matrix_step, self.matrix_grads), (self.whole_step, self.whole_grads)):
            if grads:
                groups = {g: self.optimizer.param_groups[self.groups[g].optimizer_group] for g in grads}
                plan.step(self.optimizer, groups, grads)
        for (index, zero), parts in self.batches.items():
            self.state.undo_if_skipped.append(
                fused_step(
                    self.optimizer,
                    self.optimizer.param_groups[index],
                    parts,
                    self.state.scale,
                    zero,
                    self.state.found_inf,
                )
            )


@dataclass
class OffloadedPlace(Place):
    """Masters and state off the device, updated by the host: the clip coefficient, unscale and
    overflow flag computed on the device come along (the host waits for the gradient anyway), and
    a step the host knows skipped moves and changes nothing."""

    def read_flags(self) -> None:
        """The step's factor and skip flag, in one wait, before any copy is queued (a later read
        would wait for those copies too)."""
        state = self.state
        wanted = [t.reshape(1).float() for t in (state.scale, state.found_inf) if t is not None]
        if not self.groups or not wanted:
            return
        host = self.ops.to_host(torch.cat(wanted))
        state.host_scale = host[:1].reshape(()) if state.scale is not None else None
        if state.found_inf is not None:
            state.skipped_on_host = bool(host[-1])


@dataclass
class HostPlace(OffloadedPlace):
    """CPU optimizer offload: masters and state live in host memory. A fused update streams the
    gradient down and the new weights up chunk by chunk through host staging's buffers, whose
    pieces are valid only while its generator runs, so each segment is updated at once. Torch's
    path gets the whole shard's gradient in `host_grad`: its downloads are queued, and `finish`
    waits once for all of them."""

    staging: HostStaging
    downloading: list[FlatParamGroup] = field(default_factory=list, init=False)

    def update(self, g: int, group: FlatParamGroup, param_group: dict) -> None:
        if self.state.skipped:
            return
        pieces = self.staging.pieces(group, self._run_grad(g))
        self.state.undo_if_skipped.append(
            fused_step(self.optimizer, param_group, [(group.master, pieces)], self.state.host_scale, False)
        )

    def gradient(self, g: int, group: FlatParamGroup) -> None:
        group.master.grad = None  # until its download has landed (`finish`)
        group.ensure_host_buffers()
        group.download_grads(self._run_grad(g))
        self.downloading.append(group)

    def finish(self) -> None:
        if self.downloading:
            self.ops.synchronize()  # every torch-path download has landed: one wait for all
            scale = self.state.host_scale
            for group in self.downloading:
                group.master.grad = group.host_grad if scale is None else group.host_grad.mul_(scale)


@dataclass
class SwapPlace(OffloadedPlace):
    """NVMe optimizer offload: masters and state live in the swap file. The walk binds each segment's
    master, state and host buffers to a pool buffer while the body runs (`NvmeSwapper.walk`: the
    next segments read ahead, the last written behind), so the update runs at once, there: the
    gradient comes down into the buffer, the weights go back up from it. Only fused updates:
    `_open_swap` admits nothing else, and torch's own step would run after the buffers left."""

    swapper: NvmeSwapper

    def walk(self, order: Sequence[int]) -> Iterator[int]:
        yield from self.swapper.walk([(g, self.groups[g]) for g in order])

    def fuses(self, param_group: dict) -> bool:
        return True

    def update(self, g: int, group: FlatParamGroup, param_group: dict) -> None:
        if self.state.skipped:
            return
        group.download_grads(self._run_grad(g))
        # This segment's download has landed (the swapper brings segments in one after another).
        self.ops.record().synchronize()
        parts = [(group.master, group.host_pieces())]
        self.state.undo_if_skipped.append(
            fused_step(self.optimizer, param_group, parts, self.state.host_scale, False)
        )
        group.upload_weights()


@dataclass
class DelayedPlace(OffloadedPlace):
    """`offload_overlap="delayed"`: masters and state live in host memory, with each segment's whole
    gradient and new weights in its host buffers. The walk first gives the device the weights the
    previous step's host update made; each segment's gradient then comes down, and `finish`, once
    all have landed, hands every update to a background thread as one job, to finish while the
    next step computes. Only fused updates (`_check_delayed_optimizer`)."""

    wait_previous: Callable[[], object]  # waits for the update in flight and uploads its weights
    submit: Callable[[Callable[[], None]], None]  # starts the job on the background thread
    jobs: list[tuple[torch.optim.Optimizer, dict, FlatParamGroup]] = field(default_factory=list, init=False)

    def walk(self, order: Sequence[int]) -> Iterator[int]:
        self.wait_previous()
        yield from order

    def fuses(self, param_group: dict) -> bool:
        return True

    def update(self, g: int, group: FlatParamGroup, param_group: dict) -> None:
        group.ensure_host_buffers()
        group.download_grads(self._run_grad(g))
        # The update must not see what the LR scheduler sets for the next step meanwhile.
        self.jobs.append((owner_of_group(self.optimizer, param_group), dict(param_group), group))

    def finish(self) -> None:
        # The gradients have landed and the uploads have left `host_copy`, which the update rewrites.
        self.ops.synchronize()
        if self.state.skipped:
            return  # nothing to update: the device keeps its weights, the host its state
        scale, jobs = self.state.host_scale, self.jobs

        def update() -> None:
            for owner, hyperparameters, group in jobs:
                fused_step(owner, hyperparameters, [(group.master, group.host_pieces())], scale, False)

        self.submit(update)
