"""`ZeroEngine`: ZeRO stages 0-3 over any Hugging Face or plain PyTorch model.

`hf_zero.initialize(model, optimizer, config)` re-homes the model's trainable parameters into flat
segments (see `segments.py`; units in `core/units.py`, shards in `core/layout.py`), gives each
rank fp32 master weights for its slice only, turns the user's optimizer into an optimizer over
those slices (in place, see `optim.py`), installs one gradient hook per parameter (see
`grad_sync.py`) and routes the ordinary PyTorch calls users make on the model to the engine (see
`user_paths.py`). The optimizer's own `step()` then does the whole ZeRO step through step hooks
(see `step.py`): reduce gradients, measure them in one read, update the shard with unscale and
clip folded in, all-gather the new weights. Under fp16 a `LossScaler` scales the loss in
`backward`, and a step whose gradient overflowed on any rank is skipped on every rank. So
`engine.step()`, `optimizer.step()` and the Trainer's optimizer step are the same. At stage 3
each rank keeps only its chunks of the 16-bit weights too, and `gather.py` gathers units as they
run. This file holds the set-up and the training-loop API.
"""

from __future__ import annotations

import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..checkpoint.background import BackgroundSaves
from ..config.precision import compute_dtype_for
from ..config.zero_config import ZeroConfig
from ..core.arena import segment_order
from ..core.chained_optimizer import as_one_optimizer
from ..core.device import DeviceOps
from ..core.distributed import Collectives, DistContext, free_device_memory, second_group, setup_distributed
from ..core.flat_group import FlatParamGroup
from ..core.params import (
    device_of,
    keep_in_fp32_parameter_ids,
    names_in_groups,
    trainable_parameters_by_group,
)
from ..core.units import find_units
from ..core.watchdog import CollectiveWatch
from ..offload.host_staging import HostStaging
from ..offload.nvme import NvmeSwapper
from . import registry, user_paths
from .gather import UnitGatherer
from .grad_sync import BackwardReduceScatter, StepReduction, UnitReduceScatter, watch_first_forward
from .loss_scaler import LossScaler
from .optim import check_optimizers, rebind_to_shards
from .segments import SegmentSetup, check_available, take_pending_weights
from .state import ShardedState
from .step import OptimizerStep, StepState
from .teardown import leave_group, release, release_before_teardown
from .zeropp import ZeroPlusPlus


def engine_of(module: nn.Module) -> ZeroEngine | None:
    """The engine managing `module`, if any."""
    engine = registry.managing_engine(module)
    return engine if isinstance(engine, ZeroEngine) else None


class ZeroEngine(SegmentSetup, OptimizerStep, ShardedState, nn.Module):
    """A model trained with ZeRO sharding; see `hf_zero.initialize`.

    Use it like the model (`engine(**batch)`), then `engine.backward(loss)` and `engine.step()`.
    Gradients of successive backward passes add up until `step()`, which consumes them.
    `device` is where it computes and keeps the model (default: the model's own device; under a
    launcher a GPU is each rank's own, see `distributed.choose_device`); `ZeroAccelerator` passes
    `accelerator.device`, onto which weights still on disk are read directly.
    """

    def __init__(
        self,
        module: nn.Module,
        optimizer: torch.optim.Optimizer | list[torch.optim.Optimizer],
        config: ZeroConfig,
        process_group: dist.ProcessGroup | None = None,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        check_available(config)
        optimizer = as_one_optimizer(optimizer)  # a list, such as [muon, adamw]: chained into one
        check_optimizers(optimizer, config.allow_untested_optimizer, config.whole_parameter_optimizers)
        if engine_of(module) is not None:
            raise ValueError("this model is already managed by an hf_zero engine; initialize it only once")
        self.module = module
        self.optimizer = optimizer
        self.config = config
        self.compute_dtype = compute_dtype_for(config.precision)
        # Weights still on disk (hf_zero.from_pretrained): the model has no device of its own yet.
        pending = take_pending_weights(module)
        if device is None and not pending:
            device = device_of(module)
        self.ctx: DistContext = setup_distributed(device, process_group)
        # Every page-locked buffer, event and host wait goes through this (`device.py`).
        self.device_ops = DeviceOps.for_device(self.ctx.device)
        self.comm = Collectives(self.ctx, fingerprint=config.debug_collectives)
        # Asynchronous checkpoints: their host snapshot and the save in flight (`checkpoint/background.py`).
        self.background_saves = BackgroundSaves(self.device_ops)
        # Sees every collective and wait; ends a wait past config.collective_timeout (`watchdog.py`).
        self.watch = self.comm.watch = self.device_ops.watch = CollectiveWatch(
            config.collective_timeout, self.ctx.rank, self.ctx.world_size
        )

        self.source_param_names = names_in_groups(module, optimizer)
        named = trainable_parameters_by_group(module, optimizer)
        # Stage 3 reads the weights still on disk straight into the shards (below), each rank its own
        # part; below stage 3 every rank keeps whole parameters, so it reads them whole now.
        to_shard = pending if config.stage == 3 else None
        if pending is not None and to_shard is None:
            pending.materialise_all(module)
        if to_shard is None:
            module.to(self.ctx.device)
        else:
            module._apply(lambda tensor: tensor if tensor.is_meta else tensor.to(self.ctx.device))
        self._broadcast_module_state(skip=pending)
        keep_fp32 = keep_in_fp32_parameter_ids(module, self.compute_dtype)
        # Stage 3 shards frozen weights too (in segments without masters); below, they stay whole.
        frozen = [
            [
                (name, p)
                for name, p in module.named_parameters()
                if not p.requires_grad and p.is_floating_point()
            ]
            if config.stage == 3
            else []
        ]
        self.frozen_dtypes = self._cast_frozen_parameters(
            {id(param) for pairs in named + frozen for _, param in pairs} | keep_fp32
        )
        self.units = find_units(module, config.unit_classes)
        self.swapper: NvmeSwapper | None = None
        if "nvme" in (config.offload_optimizer, config.offload_params):
            self.swapper = self._open_swap(optimizer, named, frozen)
        self.groups: list[FlatParamGroup] = self._layout_segments(named, keep_fp32, pending=to_shard)
        self.frozen: list[FlatParamGroup] = self._layout_segments(frozen, keep_fp32, False, to_shard)
        # CPU optimizer offload streams gradients and weights through these (see `host_staging.py`),
        # no larger than the largest shard.
        largest = max((g.layout.shard_numel for g in self.groups if g.offload == "cpu"), default=1)
        self.staging = HostStaging(min(config.offload_chunk_size, max(largest, 1)), self.device_ops)
        # Bytes this rank read from weight files: a pretrained model's (at stage 3 its own shard of
        # them), or the last checkpoint loaded (its own elements of the saved runs).
        self.loaded_bytes = pending.reader.bytes_read if pending is not None else 0
        if pending is not None:
            pending.close()
        rebind_to_shards(optimizer, self.groups)
        # Muon's groups, and those stepped by whole parameter, if any (`matrix_step.py`, `whole_step.py`).
        self.matrix_step, self.whole_step = self._plan_owner_steps(optimizer)
        # id(parameter) -> its unit, for every parameter laid out in segments (frozen ones included).
        self.unit_of = {id(p): g.unit for g in self.groups + self.frozen for p in g.params}
        # id(parameter) -> (segment, slot): where each trained parameter lives.
        self.slot_of = {
            id(p): (g, i) for g, group in enumerate(self.groups) for i, p in enumerate(group.params)
        }
        # Segment indices in the order their shards sit in the arenas (`arena.py`): walked in this
        # order, each param group's gradients, masters and moments are end to end.
        self.arena_order = sorted(
            range(len(self.groups)),
            key=lambda g: (segment_order(self.groups[g].optimizer_group, self.groups[g].compute_dtype), g),
        )
        layers = [unit.index for unit in self.units if not unit.is_root]
        fp32 = config.reduce_dtype == "fp32"
        if config.stage == 3 and self.ctx.world_size > 1:
            # Reduced unit by unit as the gatherer's backward walk leaves each (`rules_of_order.py`).
            self.grad_sync = UnitReduceScatter(self.groups, self.comm, [*reversed(layers), 0], fp32)
        elif config.stage == 2 and self.ctx.world_size > 1:
            position = {id(p): i for i, (_, p) in enumerate(module.named_parameters())}
            positions = [[position[id(p)] for p in g.params] for g in self.groups]
            self.grad_sync = BackwardReduceScatter(
                self.groups, self.comm, config.overlap_comm, positions, fp32
            )
        else:
            self.grad_sync = StepReduction(
                self.groups, self.comm, scatter=config.stage >= 1, reduce_fp32=fp32
            )
        self._inverse_world = torch.full((), 1.0 / self.ctx.world_size, device=self.ctx.device)

        self._hooks = [
            param.register_post_accumulate_grad_hook(self._grad_hook(g, index))
            for g, group in enumerate(self.groups)
            for index, param in enumerate(group.params)
        ]
        self._hooks.append(optimizer.register_step_pre_hook(self._before_optimizer_step))
        self._hooks.append(optimizer.register_step_post_hook(self._after_optimizer_step))
        registry.register(self)
        # Functions replaced on the user's objects (zero_grad, generate, ...), put back by `close()`.
        self.patches = user_paths.Patches()
        self._hooks.extend(user_paths.install(self, self.patches))
        if isinstance(self.grad_sync, BackwardReduceScatter) and config.overlap_comm and config.stage == 2:
            self._hooks.extend(watch_first_forward(module, self.slot_of, self.grad_sync))
        self.gatherer: UnitGatherer | None = None
        if config.stage == 3:
            # Gathers get a process group of their own: their order never mixes with the
            # reduce-scatters, whose timing follows each rank's backward.
            self.gather_comm = Collectives(
                second_group(self.ctx), fingerprint=config.debug_collectives, name="gather"
            )
            self.gather_comm.watch = self.watch
        self.communicators = [self.comm] + ([self.gather_comm] if config.stage == 3 else [])
        # ZeRO++ (`zeropp.py`): node-local communicators of its own, made after the gather group.
        self.zeropp = ZeroPlusPlus.build(
            self.ctx, config, self.communicators, self.grad_sync, self.groups + self.frozen, self.units
        )
        if config.stage == 3:
            end_unit = self.grad_sync.end_unit if isinstance(self.grad_sync, UnitReduceScatter) else None
            self.gatherer = UnitGatherer(
                self.units,
                self.groups + self.frozen,
                self.gather_comm,
                config.prefetch_bytes,
                on_unit_end=end_unit if config.overlap_comm else None,
                reader=self.swapper if config.offload_params == "nvme" else None,
                zeropp=self.zeropp,
            )
            self._hooks.extend(self.gatherer.install(module))

        # offload_overlap="delayed": the host update of the last step, running while this one computes.
        self._delayed: ThreadPoolExecutor | None = None
        self._delayed_update: Future | None = None
        if config.offload_overlap == "delayed":
            self._check_delayed_optimizer(optimizer)
            self._delayed = ThreadPoolExecutor(1, thread_name_prefix="hf_zero-delayed-update")
            self._hooks.append(module.register_forward_pre_hook(self._finish_update_before_eval))
        self.loss_scaler = LossScaler(config) if config.precision == "fp16" else None
        self._in_backward = False
        self.last_step_skipped = False
        self.step_state = StepState()
        self.last_grad_norm: torch.Tensor | None = None
        # Bytes this rank sent in the last step's collectives (ring model, `Collectives`), in all
        # and by communicator (main, gather, hpz, qgz_intra, qgz_inter).
        self.last_step_comm_bytes = 0
        self.last_step_comm_bytes_by_communicator: dict[str, int] = {}
        self.global_steps = 0
        self.comm.bytes_sent = 0
        # Threads and the swap file end with the engine, at the interpreter's exit at the latest (see
        # `teardown.py`). Nothing the finalizer holds may lead back to the engine.
        comms = list(self.communicators)
        swap_file = self.swapper.file if self.swapper is not None else None
        self._release = weakref.finalize(self, release, comms, self._delayed, swap_file)
        release_before_teardown(self._release)

    def _grad_hook(self, group: int, index: int):
        # Tensor hooks live in C++, out of the garbage collector's sight: a hook holding the engine
        # would keep it (its memory, its swap file) alive for as long as the parameter exists.
        engine = weakref.ref(self)

        def hook(param: torch.Tensor) -> None:
            self = engine()
            grad = param.grad
            if self.loss_scaler is not None and not self._in_backward:
                raise RuntimeError(
                    "under fp16 the loss must be scaled before backward: call engine.backward(loss) (or "
                    "accelerator.backward(loss)) instead of loss.backward(); hf_zero multiplies the loss by "
                    "engine.loss_scale there and divides it out in the optimizer step"
                )
            if grad is not None:
                self.grad_sync.on_grad(group, index, grad)
                param.grad = None

        return hook

    # ---- the training-loop API ------------------------------------------------------------------

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the wrapped model."""
        return self.module(*args, **kwargs)

    @property
    def loss_scale(self) -> float:
        """The factor `backward` multiplies the loss by (1.0 outside fp16)."""
        return self.loss_scaler.scale if self.loss_scaler is not None else 1.0

    @property
    def skipped_steps(self) -> int:
        """Optimizer steps skipped so far because the fp16 gradient overflowed (0 outside fp16)."""
        return self.loss_scaler.skipped_steps if self.loss_scaler is not None else 0

    @property
    def world_size(self) -> int:
        return self.ctx.world_size

    @property
    def rank(self) -> int:
        return self.ctx.rank

    @property
    def device(self) -> torch.device:
        return self.ctx.device

    def backward(self, loss: torch.Tensor, **kwargs: Any) -> None:
        """Backpropagate `loss`; gradients add to those of earlier backward calls since the last step."""
        self.grad_sync._check_open()
        if self.loss_scaler is not None:
            # 1/world here rather than in the step: each rank's gradient of its own mean loss is
            # about `world` times its share of the global mean, so scaled by `scale` alone the local
            # backward and the sum over ranks run `world` times hotter than unsharded training and
            # the scale settles log2(world) bits lower. Divided first, every value stays at the
            # unsharded magnitude (exact for powers of two) and the sum over ranks is the mean.
            loss = loss.float() * (self.loss_scaler.scale / self.ctx.world_size)
        self._in_backward = True
        with self.watch.engine_call("backward"):
            try:
                loss.backward(**kwargs)
            finally:
                self._in_backward = False
            # Every rank ends the pass here, whatever its gradients reached: stage 2 sends every bucket.
            self.end_backward(force=True)

    def end_backward(self, force: bool = False) -> None:
        """Finish the backward pass that ran last: send what is left to reduce and (stage 3)
        release the gathered parameters. `engine.backward`, the model's next forward, `zero_grad`
        and the step call it; `force` ends a pass even on a rank no gradient reached."""
        # The gatherer's walk first: it ends (and so reduces) the units this rank's backward did not
        # reach, between the gathers other ranks' backward needs, in the order every rank issues.
        # Without gradients since the last pass, no backward ran here (a forward with gradients
        # whose backward never came): nothing is reduced.
        if self.gatherer is not None:
            self.gatherer.end_backward(reduce=force or self.grad_sync.pending)
        self.grad_sync.end_backward(force=force)

    def step(self) -> None:
        """Take one optimizer step on the accumulated gradients and clear them."""
        self.optimizer.step()

    def close(self) -> None:
        """Release what the engine holds beyond memory: wait for the asynchronous checkpoint in flight
        (raising its error) and for the host update in flight (offload_overlap="delayed", whose
        weights then stay unpublished) and stop its thread, close the NVMe swap file, put back the
        functions hf_zero replaced on the model and optimizer (`user_paths.Patches`), destroy the
        process group the engine made for stage-3 gathers. Not a collective, but call it on every
        rank once training, saving and evaluating are over: the engine runs no collective
        afterwards. Garbage collection and the interpreter's exit release the threads and file
        too; the gather group then ends with the default process group."""
        own_group = self.gather_comm.group_ref if self.gatherer is not None else None
        try:
            self.background_saves.close()
        finally:
            self.watch.close()
            self.patches.remove()
            self._release()
            leave_group(own_group)

    def device_counts(self) -> dict[str, int]:
        """What this engine has asked of its device so far (`device.py`): host waits for all queued work
        or a device value, waits for one recorded point, page-locked host bytes, scratch buffers asked
        for and allocated. Compare two readings for a step's counts."""
        return self.device_ops.counts()

    def trace_collectives(self) -> list[tuple[str, str, int, int | None]]:
        """Start recording every collective this rank issues from now on, on all the engine's
        communicators in one list: `(operation, communicator, bytes, unit)` in issue order (see
        `rules_of_order.py`). Returns the list, which keeps growing; call again for a fresh one."""
        trace: list[tuple[str, str, int, int | None]] = []
        for comm in self.communicators:
            comm.trace = trace
        return trace

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Discard gradients accumulated since the last step (`optimizer.zero_grad()` and
        `model.zero_grad()` do the same)."""
        self.end_backward()
        self.grad_sync.discard()
        nn.Module.zero_grad(self.module, set_to_none=set_to_none)
        self.clear_optimizer_grads(set_to_none=set_to_none)
        self.step_state = StepState()

    def generate_gathers_once(self) -> bool:
        """Stage 3: whether `model.generate` should gather the whole model once for the call
        (`ZeroConfig.generate_gather`; "auto": when every rank has room for the full 16-bit
        weights in half its free device memory). A collective under "auto"."""
        mode = self.config.generate_gather
        if len(self.gatherer.pinned) == len(self.units):  # inside gathered_parameters: nothing to gather
            return True
        if mode != "auto":
            return mode == "once"
        needed = sum(self.gatherer.unit_bytes)
        fits = torch.tensor(
            [float(needed <= free_device_memory(self.ctx.device) // 2)], device=self.ctx.device
        )
        self.gather_comm.all_reduce(fits, op=dist.ReduceOp.MIN)
        return bool(self.device_ops.read(fits))


def initialize(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | list[torch.optim.Optimizer],
    config: ZeroConfig | dict | str | None = None,
    process_group: dist.ProcessGroup | None = None,
) -> ZeroEngine:
    """Shard `model` and `optimizer` per `config` and return the engine that trains them.

    `optimizer` is any elementwise torch optimizer built over `model.parameters()`, or a list of
    optimizers over disjoint parameters (`[torch.optim.Muon(matrices), torch.optim.AdamW(rest)]`),
    chained into one `ChainedOptimizer`; it keeps its class, param groups and hyper-parameters and
    becomes `engine.optimizer`, an optimizer over this rank's flat shards. Launch with torchrun (or
    accelerate launch) for several ranks; a plain `python` process is a world of one. `process_group` shards over that group of ranks only (the
    data-parallel group beside tensor or pipeline parallelism); by default, over every rank.
    """
    return ZeroEngine(model, optimizer, ZeroConfig.coerce(config), process_group)
