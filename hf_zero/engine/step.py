"""The optimizer step: what `optimizer.step()` (and so `engine.step()` and the Trainer's step) runs
through the step hooks hf_zero installs on the user's optimizer.

Before the optimizer's own step: reduce the gradients, measure them in one read (norm and fp16
overflow, `kernels/grad_stats.py`), clip, then update each segment where its pieces live: on the
device with the fused kernels, on the host with CPU offload (`offload/host_staging.py`), through
the NVMe swapper, on a background thread for `offload_overlap="delayed"`, Muon's groups by
`matrix_step.py` (Newton–Schulz at each matrix's owner), those of optimizers that need whole
tensors by `whole_step.py` (each parameter at its owner), or by the optimizer's own step for what
the fused kernels do not cover. After it: round the masters the optimizer's own
step updated, all-gather the new weights, and undo a step fp16 skipped. What one step found and
did lives in one `StepState`, replaced at each step.

`OptimizerStep` is a part of `ZeroEngine` (a mixin).
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..core.arena import merge_adjacent
from ..core.chained_optimizer import owner_of_group
from ..core.flat_group import FlatParamGroup
from ..kernels.grad_stats import grad_stats
from .fused_step import fused_step, supports_fused_step
from .matrix_step import MatrixStep, is_muon
from .optim import is_whole_parameter
from .whole_step import WholeParameterStep


@dataclass
class StepState:
    """What this step has found and done so far (a fresh one after each step and `zero_grad`)."""

    grads_reduced: bool = False
    clipped: bool = False
    grad_scale: torch.Tensor | None = None  # the clip coefficient, on the device
    stats: torch.Tensor | None = None  # [sum of squares, non-finite count]: see `_gradient_stats`
    found_inf: torch.Tensor | None = None  # fp16: nonzero when this step overflowed, on the device
    skipped_on_host: bool | None = None  # `found_inf` once the host has read it
    zeroed_in_kernel: set[int] = field(default_factory=set)  # segments whose gradient the kernel zeroed
    fused_groups: set[int] = field(default_factory=set)  # segments the fused kernels updated
    undo_if_skipped: list = field(default_factory=list)  # the fused steps' host bookkeeping


class OptimizerStep:
    """Clipping, the full gradient and the step hooks of `ZeroEngine`."""

    _delayed: ThreadPoolExecutor | None
    _delayed_update: Future | None
    matrix_step: MatrixStep | None
    whole_step: WholeParameterStep | None

    def _plan_owner_steps(
        self, optimizer: torch.optim.Optimizer
    ) -> tuple[MatrixStep | None, WholeParameterStep | None]:
        """The steps that need whole parameters at their owners: Muon's (None: no Muon group) and
        that of optimizers stepped by whole parameter (None: none). Each takes every segment of its
        param groups, an empty group's empty one too: the optimizer's own step never sees a shard."""
        owners = {
            g: owner_of_group(optimizer, optimizer.param_groups[group.optimizer_group])
            for g, group in enumerate(self.groups)
        }
        muon = {g: self.groups[g] for g, owner in owners.items() if is_muon(owner)}
        names = self.config.whole_parameter_optimizers
        whole = {g: self.groups[g] for g, owner in owners.items() if is_whole_parameter(owner, names)}
        if (muon or whole) and (
            self.config.offload_optimizer != "none" or self.config.offload_overlap == "delayed"
        ):
            name = type(owners[next(iter(muon or whole))]).__name__
            raise ValueError(
                f"{name} runs on the device with hf_zero (its update beside the gradients, whole matrices at "
                f"their owners), not with offload_optimizer={self.config.offload_optimizer!r} / offload_overlap="
                f"{self.config.offload_overlap!r}; use offload_optimizer='none' with {name}"
            )
        return (
            MatrixStep(muon, self.comm) if muon else None,
            WholeParameterStep(whole, self.comm) if whole else None,
        )

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Global 2-norm of the accumulated (rank-averaged) gradient; scales it down to `max_norm`.

        Returns the norm before clipping (of the unscaled gradient under fp16; inf or NaN when it
        overflowed, and the step will be skipped). An infinite `max_norm` only measures. The
        scaling is applied inside the optimizer step (folded into the fused update where there is
        one), so the host never waits for the norm. `torch.nn.utils.clip_grad_norm_(model.parameters(), ...)`
        comes here too. No further backward pass may add to this step's gradients afterwards.
        """
        total = self._gradient_stats()[0].sqrt() * self._unscale_factor()
        if max_norm != float("inf"):
            coefficient = torch.clamp(max_norm / (total + 1e-6), max=1.0)
            self.step_state.grad_scale = (
                coefficient
                if self.step_state.grad_scale is None
                else self.step_state.grad_scale * coefficient
            )
            self.step_state.clipped = True
        self.last_grad_norm = total
        return total

    def get_global_grad_norm(self) -> torch.Tensor | None:
        """The gradient norm measured for the last (or coming) step, as DeepSpeed's engine reports it."""
        return self.last_grad_norm

    def full_grad(self, param: torch.Tensor) -> torch.Tensor:
        """The complete rank-averaged fp32 gradient of one managed parameter, on the device.

        `param.grad` stays None under hf_zero (each rank keeps a slice of the reduced gradient);
        this gathers the whole of it, before any clipping. A collective: every rank must call it for
        the same parameters in the same order. Like clipping, it reduces this step's gradients, so
        no further backward pass may add to them before `step()` or `zero_grad()`.
        """
        located = self.slot_of.get(id(param))
        if located is None:
            raise ValueError("full_grad: this tensor is not a parameter trained by this hf_zero engine")
        g, index = located
        self._reduce_grads("full_grad")
        group, slot = self.groups[g], self.groups[g].layout.slots[index]
        full = torch.zeros(slot.numel, dtype=torch.float32, device=self.ctx.device)
        for span in group.spans_by_slot[index]:
            full[span.param_begin : span.param_begin + span.length].copy_(self.grad_sync.span_grad(g, span))
        if group.layout.num_shards > 1:
            self.comm.all_reduce(full)
        return full.mul_(self._unscale_factor()).view(slot.shape)

    def _reduce_grads(self, reason: str) -> None:
        if not self.step_state.grads_reduced:
            self.end_backward()
            self.grad_sync.reduce()
            self.grad_sync.closed_by = reason
            self.step_state.grads_reduced = True

    def _gradient_stats(self) -> torch.Tensor:
        """`[Σg², non-finite count]` of this step's reduced gradient (summed over ranks, still
        loss-scaled) on every rank, as a device tensor: one read of each owned shard and one
        all-reduce carrying both numbers. Measured once per step."""
        if self.step_state.stats is None:
            self._reduce_grads("clip_grad_norm_")
            # In arena order, where the segments' gradients sit end to end: one read per dtype.
            owned = [t for g in self.arena_order for t in self.grad_sync.owned_grads(g)]
            stats = grad_stats([row[0] for row in merge_adjacent([(t,) for t in owned])]).to(self.ctx.device)
            if any(group.layout.num_shards > 1 for group in self.groups):
                self.comm.all_reduce(stats)
            self.step_state.stats = stats
        return self.step_state.stats

    def _unscale_factor(self) -> torch.Tensor:
        """What turns the reduced gradient into the mean unscaled gradient: 1/world (the reduction
        sums), or under fp16 1/loss scale (`backward` divided the loss by the world size already)."""
        if self.loss_scaler is None:
            return self._inverse_world
        return torch.full((), 1.0 / self.loss_scaler.scale, device=self.ctx.device)

    def _step_scale(self) -> torch.Tensor | None:
        """What the optimizer multiplies the reduced gradient by: `_unscale_factor` and the clip
        coefficient, as one device scalar (None: nothing to multiply by)."""
        if self.ctx.world_size == 1 and self.loss_scaler is None:
            return self.step_state.grad_scale
        if self.step_state.grad_scale is None:
            return self._unscale_factor()
        return self.step_state.grad_scale * self._unscale_factor()

    def _check_parameters_in_place(self) -> None:
        for group in self.groups + self.frozen:
            moved = group.moved_parameter()
            if moved is not None:
                param = group.params[moved]
                raise RuntimeError(
                    f"parameter {group.layout.slots[moved].name} no longer lives in hf_zero's flat buffer (it is now "
                    f"{param.dtype} on {param.device}); something moved or cast the model after hf_zero.initialize, "
                    "e.g. model.to(...), model.half() or model.cuda(), and the engine would keep updating weights "
                    "the model no longer uses. The engine owns placement and precision: set ZeroConfig.precision "
                    "and move the model before initialize"
                )

    def _before_optimizer_step(self, optimizer, args, kwargs) -> None:
        """Reduce and clip, then update Adam/SGD groups with the fused kernels; the rest get their
        gradient and are updated by the optimizer's own step, which skips gradient-less params.

        Under fp16 the overflow flag stays on the device for the fused kernels (which then change
        nothing); only groups on torch's path make the host read it here, to withhold their
        gradients from a skipped step."""
        self.watch.begin("step")
        self._check_parameters_in_place()
        self._reduce_grads("the optimizer step")
        if self.config.gradient_clipping > 0 and not self.step_state.clipped:
            self.clip_grad_norm_(self.config.gradient_clipping)
        found_inf = self.step_state.found_inf = (
            self._gradient_stats()[1:] if self.loss_scaler is not None else None
        )
        scale = self._step_scale()
        host_scale, skipped = None, False
        torch_path = [
            group
            for group in self.groups
            if not group.offloaded
            and not supports_fused_step(optimizer, optimizer.param_groups[group.optimizer_group])
        ]
        if any(group.offloaded for group in self.groups):
            # The host update needs both on the host: read them in one wait, before any copy is
            # queued (a later read would wait for those copies too).
            host_scale, skipped = self._read_scale_and_flag(scale, found_inf)
        elif torch_path and found_inf is not None:
            # Torch's own update must not see a skipped step's gradients: one read for all groups.
            skipped = self._read_skip_flag(found_inf)
        if self._delayed is not None:
            self._start_delayed_update(optimizer, host_scale, skipped)
        elif self.config.offload_optimizer == "nvme":
            self.swapper.step(
                list(enumerate(self.groups)),
                lambda g, group: self._swapped_step(
                    optimizer, g, group, optimizer.param_groups[group.optimizer_group], host_scale, skipped
                ),
            )
        host_path: list[FlatParamGroup] = []  # torch-path groups whose gradients are coming down
        matrix_grads: dict[int, torch.Tensor] = {}  # Muon's segments: their gradient shards
        whole_grads: dict[int, torch.Tensor] = {}  # those stepped by whole parameter
        fused: dict[tuple[int, bool], list] = {}  # (param group, zero the gradient) -> its parts
        # In arena order: each param group's segments end to end, stepped in one launch.
        for g in self.arena_order:
            group = self.groups[g]
            param_group = optimizer.param_groups[group.optimizer_group]
            if group.offloaded:
                on_host = group.offload == "cpu" and self._delayed is None
                if on_host and self._host_step(optimizer, g, group, param_group, host_scale, skipped):
                    host_path.append(group)
            elif supports_fused_step(optimizer, param_group):
                zero = self.grad_sync.kernel_zeroes(g)
                pieces = [
                    (run.shard_start, run.length, self.grad_sync.run_grad(g, run), group.flat_run(run))
                    for run in group.runs
                ]
                fused.setdefault((group.optimizer_group, zero), []).append((group.master, pieces))
                group.master.grad = None
                self.step_state.fused_groups.add(g)
                if zero:
                    self.step_state.zeroed_in_kernel.add(g)
            elif skipped:
                group.master.grad = None  # torch's optimizers leave gradient-less parameters alone
            else:
                grad = torch.empty_like(group.master.data)
                for run in group.runs:
                    grad[run.shard_start : run.shard_start + run.length].copy_(
                        self.grad_sync.run_grad(g, run)
                    )
                grad = grad if scale is None else grad.mul_(scale)
                # Stepped below; the optimizer's own step skips a shard without a gradient.
                if self.matrix_step is not None and g in self.matrix_step.segments:
                    matrix_grads[g] = grad
                elif self.whole_step is not None and g in self.whole_step.segments:
                    whole_grads[g] = grad
                else:
                    group.master.grad = grad
        for plan, grads in ((self.matrix_step, matrix_grads), (self.whole_step, whole_grads)):
            if grads:
                groups = {g: optimizer.param_groups[self.groups[g].optimizer_group] for g in grads}
                plan.step(optimizer, groups, grads)
        for (index, zero), parts in fused.items():
            self.step_state.undo_if_skipped.append(
                fused_step(optimizer, optimizer.param_groups[index], parts, scale, zero, found_inf)
            )
        if host_path:
            self.device_ops.synchronize()  # every torch-path download has landed: one wait for all
            for group in host_path:
                group.master.grad = (
                    group.host_grad if host_scale is None else group.host_grad.mul_(host_scale)
                )

    def _read_scale_and_flag(
        self, scale: torch.Tensor | None, found_inf: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, bool]:
        """The step's gradient factor and skip flag on the host, in one wait for the device."""
        wanted = [t.reshape(1).float() for t in (scale, found_inf) if t is not None]
        if not wanted:
            return None, False
        host = self.device_ops.to_host(torch.cat(wanted))
        host_scale = host[:1].reshape(()) if scale is not None else None
        skipped = found_inf is not None and bool(host[-1])
        if found_inf is not None:
            self.step_state.skipped_on_host = skipped
        return host_scale, skipped

    def _read_skip_flag(self, found_inf: torch.Tensor) -> bool:
        """Whether this step overflowed (fp16), read on the host once per step."""
        if self.step_state.skipped_on_host is None:
            self.step_state.skipped_on_host = bool(self.device_ops.read(found_inf))
        return self.step_state.skipped_on_host

    def _host_step(
        self, optimizer, g: int, group: FlatParamGroup, param_group: dict, scale, skipped: bool
    ) -> bool:
        """CPU optimizer offload: stream this rank's reduced gradient to the host chunk by chunk,
        update the host masters there with the fused step's CPU path, and stream the new weights
        back (`host_staging.py`); optimizers on torch's own path get the whole shard's gradient,
        whose download this queues: returns True when the caller must wait for it and hand it to
        the master (once for all such groups). The clip coefficient, unscale and overflow flag
        were computed on the device and come along (the host must wait for the gradient anyway).
        A skipped step moves and changes nothing."""
        group.master.grad = None
        if supports_fused_step(optimizer, param_group):
            self.step_state.fused_groups.add(g)
            if not skipped:
                pieces = self.staging.pieces(group, lambda run: self.grad_sync.run_grad(g, run))
                self.step_state.undo_if_skipped.append(
                    fused_step(optimizer, param_group, [(group.master, pieces)], scale, False)
                )
            return False
        if skipped:
            return False
        group.ensure_host_buffers()
        group.download_grads(lambda run: self.grad_sync.run_grad(g, run))
        return True

    def _swapped_step(
        self, optimizer, g: int, group: FlatParamGroup, param_group: dict, scale, skipped: bool
    ) -> None:
        """NVMe optimizer offload, for one segment the swapper has brought in (its master, state and
        buffers): bring the gradient down into the buffer, update, send the new weights back (a
        skipped step does none of it). Only fused updates: see `_open_swap`."""
        group.master.grad = None
        self.step_state.fused_groups.add(g)
        if skipped:
            return
        group.download_grads(lambda run: self.grad_sync.run_grad(g, run))
        # This segment's download has landed (the swapper brings segments in one after another).
        self.device_ops.record().synchronize()
        self.step_state.undo_if_skipped.append(
            fused_step(optimizer, param_group, [(group.master, group.host_pieces())], scale, False)
        )
        group.upload_weights()

    def _check_delayed_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        for group in optimizer.param_groups:
            if not supports_fused_step(optimizer, group):
                raise ValueError(
                    f"offload_overlap='delayed' runs Adam, AdamW or SGD (hf_zero's fused update) in the "
                    f"background, not {type(optimizer).__name__} with these settings; use one of those, or "
                    "offload_overlap='exact'"
                )

    def _start_delayed_update(self, optimizer, scale, skipped: bool) -> None:
        """Give the device the weights the previous step's host update made, then start this step's
        update on the host, to finish while the next step computes."""
        self._wait_delayed_update(upload=True)
        for g, group in enumerate(self.groups):
            group.ensure_host_buffers()
            group.download_grads(lambda run, g=g: self.grad_sync.run_grad(g, run))
            group.master.grad = None
            self.step_state.fused_groups.add(g)
        # The gradients have landed and the uploads have left `host_copy`, which the update rewrites.
        self.device_ops.synchronize()
        if skipped:
            return  # nothing to update: the device keeps its weights, the host its state
        # The update must not see what the LR scheduler sets for the next step meanwhile.
        jobs = []
        for group in self.groups:
            param_group = optimizer.param_groups[group.optimizer_group]
            jobs.append((owner_of_group(optimizer, param_group), dict(param_group), group))

        def update() -> None:
            for owner, hyperparameters, group in jobs:
                fused_step(owner, hyperparameters, [(group.master, group.host_pieces())], scale, False)

        self._delayed_update = self._delayed.submit(update)

    def _wait_delayed_update(self, upload: bool) -> bool:
        """Wait for the host update in flight, if any; with `upload`, send its weights to the device
        chunks (the caller publishes them). Returns whether there was one."""
        if self._delayed_update is None:
            return False
        update, self._delayed_update = self._delayed_update, None
        update.result()
        if upload:
            for group in self.groups:
                group.upload_weights()
        return True

    def finish_delayed_update(self) -> None:
        """offload_overlap="delayed": bring the model up to date with its masters now (the last
        step's update lands in the weights and is all-gathered), as saving, evaluating and loading
        do by themselves. A collective every rank must call; nothing happens with no update in flight."""
        if self._wait_delayed_update(upload=False):
            self.publish_masters()

    def _finish_update_before_eval(self, module: nn.Module, args: Any) -> None:
        if self._delayed_update is not None and not module.training:
            self.finish_delayed_update()

    def _after_optimizer_step(self, optimizer, args, kwargs) -> None:
        for g, group in enumerate(self.groups):
            if g not in self.step_state.fused_groups:
                group.master.grad = None
                group.round_master()
        for work in self.comm.all_gather_many([pair for group in self.groups for pair in group.publish()]):
            work.wait()
        self.grad_sync.clear_after_step(self.step_state.zeroed_in_kernel)
        # The one host read of the overflow flag, after every kernel and collective was issued
        # (unless the step read it before it queued them).
        skipped = self.step_state.found_inf is not None and self._read_skip_flag(self.step_state.found_inf)
        if skipped:
            for undo in self.step_state.undo_if_skipped:
                undo()
        self.last_step_skipped = skipped
        self.step_state = StepState()
        self.global_steps += 1
        if self.gatherer is not None:
            self.gatherer.release_all()  # anything still gathered now holds the old weights
            self.gatherer.weights_changed()
        self.last_step_comm_bytes_by_communicator = {}
        for comm in self.communicators:
            comm.check_fingerprint()
            self.last_step_comm_bytes_by_communicator[comm.name] = comm.bytes_sent
            comm.bytes_sent = 0
        self.last_step_comm_bytes = sum(self.last_step_comm_bytes_by_communicator.values())
        if self.swapper is not None:
            self.swapper.settle_params()  # offload_params="nvme": the new weights go to the file
        self.watch.end("step")
        if self.loss_scaler is not None:
            self.loss_scaler.update(skipped)  # last: it raises when the scale cannot go lower
