"""The optimizer step: what `optimizer.step()` (and so `engine.step()` and the Trainer's step) runs
through the step hooks hf_zero installs on the user's optimizer.

Before the optimizer's own step: reduce the gradients, measure them in one read (norm and fp16
overflow, `kernels/grad_stats.py`), clip, then take every segment through one loop whose body is
the same wherever the segment lives: a param group the fused kernels cover gets its update, one
on torch's path its scaled gradient, for the optimizer's own step (which skips gradient-less
params), Muon's (`matrix_step.py`) and those of optimizers that need whole tensors
(`whole_step.py`) stepped at each parameter's owner. The engine's place (`step_places.py`:
on the device, CPU offload's host staging, the NVMe swap, the delayed host update) decides only
where each segment's pieces live while it is stepped and when its update is launched. After the
optimizer's own step: round the masters it updated, all-gather the new weights, and undo a step
fp16 skipped. What one step found and did lives in one `StepState`, replaced at each step.

`OptimizerStep` is a part of `ZeroEngine` (a mixin).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from torch import nn

from ..core.arena import merge_adjacent
from ..core.chained_optimizer import owner_of_group
from ..kernels.grad_stats import grad_stats
from .fused_step import supports_fused_step
from .matrix_step import MatrixStep, is_muon
from .optim import is_whole_parameter
from .step_places import DelayedPlace, DevicePlace, HostPlace, Place, StepState, SwapPlace
from .whole_step import WholeParameterStep


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
        """Reduce and clip, then step every segment where it lives (`step_places.py`): fused
        updates for the param groups the kernels cover; the rest get their gradient and are
        updated by the optimizer's own step, which skips gradient-less params.

        Under fp16 the overflow flag stays on the device for the fused kernels (which then change
        nothing); only groups on torch's path, or an update on the host, make the host read it
        here, to withhold their gradients from a skipped step or leave it undone."""
        self.watch.begin("step")
        self._check_parameters_in_place()
        self._reduce_grads("the optimizer step")
        if self.config.gradient_clipping > 0 and not self.step_state.clipped:
            self.clip_grad_norm_(self.config.gradient_clipping)
        state = self.step_state
        state.found_inf = self._gradient_stats()[1:] if self.loss_scaler is not None else None
        state.scale = self._step_scale()
        place = self._place(optimizer)
        place.read_flags()
        # In arena order: each param group's segments end to end, so a batched update is one launch.
        walk = place.walk(self.arena_order)
        try:
            for g in walk:
                group = self.groups[g]
                param_group = optimizer.param_groups[group.optimizer_group]
                if place.fuses(param_group):
                    group.master.grad = None
                    state.fused_groups.add(g)
                    place.update(g, group, param_group)
                elif state.skipped:
                    group.master.grad = None  # torch's optimizers leave gradient-less parameters alone
                else:
                    place.gradient(g, group)
        except BaseException as error:
            # The walk hears of it where it stopped (the NVMe swap records it: its file is now
            # partly written), and it goes on up.
            walk.throw(error)
            raise
        place.finish()

    def _place(self, optimizer: torch.optim.Optimizer) -> Place:
        """Where this engine's step finds each segment's pieces (a fresh place per step)."""
        parts = (optimizer, self.groups, self.step_state, self.grad_sync, self.device_ops)
        if self._delayed is not None:
            return DelayedPlace(
                *parts,
                wait_previous=lambda: self._wait_delayed_update(upload=True),
                submit=self._submit_delayed_update,
            )
        if self.config.offload_optimizer == "nvme":
            return SwapPlace(*parts, swapper=self.swapper)
        if self.config.offload_optimizer == "cpu":
            return HostPlace(*parts, staging=self.staging)
        return DevicePlace(*parts, matrix_step=self.matrix_step, whole_step=self.whole_step)

    def _check_delayed_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        for group in optimizer.param_groups:
            if not supports_fused_step(optimizer, group):
                raise ValueError(
                    f"offload_overlap='delayed' runs Adam, AdamW or SGD (hf_zero's fused update) in the "
                    f"background, not {type(optimizer).__name__} with these settings; use one of those, or "
                    "offload_overlap='exact'"
                )

    def _submit_delayed_update(self, update: Callable[[], None]) -> None:
        """Start this step's host update (`DelayedPlace`), to finish while the next step computes."""
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
        skipped = self.step_state.found_inf is not None and self.step_state.read_skipped(self.device_ops)
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
