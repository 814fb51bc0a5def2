"""`ZeroEngine`: ZeRO stages 0-3 over any Hugging Face or plain PyTorch model.

`hf_zero.initialize(model, optimizer, config)` re-homes the model's trainable parameters into
flat segments, one per unit and param group (see `units.py`, `layout.py`), gives each rank fp32 master weights for its slice only, turns the
user's optimizer into an optimizer over those slices (in place, see `optim.py`), installs one
gradient hook per parameter (see `grad_sync.py`) and routes the ordinary PyTorch calls users make
on the model to the engine (see `user_paths.py`). The optimizer's own `step()` then does the
whole ZeRO step through step hooks: reduce gradients, measure them in one read (norm and fp16
overflow, see `kernels/grad_stats.py`), update the shard (Adam/AdamW and SGD groups in one fused
pass with unscale and clip folded in, see `fused_step.py`), all-gather the new weights. Under fp16
a `LossScaler` scales the loss in `backward`, and a step whose gradient overflowed on any rank is
skipped on every rank. So `engine.step()`,
`optimizer.step()` and the Trainer's optimizer step are the same. At stage 3 each rank keeps only
its chunks of the 16-bit weights too, and `gather.py` gathers units as they run.
"""

from __future__ import annotations

import os
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from . import user_paths
from .arena import carve_ordered, merge_adjacent, segment_order
from .config import ZeroConfig
from .device import DeviceOps
from .distributed import Collectives, DistContext, free_device_memory, second_group, setup_distributed
from .engine_state import ShardedState
from .flat_group import FlatParamGroup
from .fused_step import fused_step, supports_fused_step
from .gather import UnitGatherer
from .grad_sync import BackwardReduceScatter, StepReduction, UnitReduceScatter
from .host_staging import HostStaging
from .kernels.grad_stats import grad_stats
from .layout import FlatLayout
from .loss_scaler import LossScaler
from .nvme import ALIGN as NVME_ALIGN
from .nvme import NvmeSwapper, check_free_space, existing_folder, state_keys
from .optim import check_elementwise, rebind_to_shards
from .params import device_of, keep_in_fp32_parameter_ids, names_in_groups, trainable_parameters_by_group
from .pending import PendingWeights, initialise_new_adapters
from .precision import compute_dtype_for
from .teardown import leave_group, release, release_before_teardown
from .units import find_units

_ENGINE_ATTR = "_hf_zero_engine"


def engine_of(module: nn.Module) -> ZeroEngine | None:
    """The engine managing `module`, if any."""
    ref = module.__dict__.get(_ENGINE_ATTR)
    return ref() if ref is not None else None


class ZeroEngine(ShardedState, nn.Module):
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
        optimizer: torch.optim.Optimizer,
        config: ZeroConfig,
        process_group: dist.ProcessGroup | None = None,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        check_available(config)
        check_elementwise(optimizer, config.allow_untested_optimizer)
        if engine_of(module) is not None:
            raise ValueError("this model is already managed by an hf_zero engine; initialize it only once")
        self.module = module
        self.optimizer = optimizer
        self.config = config
        self.compute_dtype = compute_dtype_for(config.precision)
        # Weights still on disk (hf_zero.from_pretrained): the model has no device of its own yet.
        pending = _take_pending_weights(module)
        if device is None and not pending:
            device = device_of(module)
        self.ctx: DistContext = setup_distributed(device, process_group)
        # Every page-locked buffer, event and host wait goes through this (`device.py`).
        self.device_ops = DeviceOps.for_device(self.ctx.device)
        self.comm = Collectives(self.ctx, fingerprint=config.debug_collectives)

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
        self._frozen_dtypes = self._cast_frozen_parameters(
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
        self._hooks.extend(user_paths.install(self))
        if isinstance(self.grad_sync, BackwardReduceScatter) and config.overlap_comm and config.stage == 2:
            self._hooks.extend(self._watch_first_forward())
        self.gatherer: UnitGatherer | None = None
        if config.stage == 3:
            # Gathers get a process group of their own: their order never mixes with the
            # reduce-scatters, whose timing follows each rank's backward.
            self.gather_comm = Collectives(
                second_group(self.ctx), fingerprint=config.debug_collectives, name="gather"
            )
            end_unit = self.grad_sync.end_unit if isinstance(self.grad_sync, UnitReduceScatter) else None
            self.gatherer = UnitGatherer(
                self.units,
                self.groups + self.frozen,
                self.gather_comm,
                config.prefetch_bytes,
                on_unit_end=end_unit if config.overlap_comm else None,
            )
            self._hooks.extend(self.gatherer.install(module))
        module.__dict__[_ENGINE_ATTR] = weakref.ref(self)

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
        self._reset_step_state()
        self.last_grad_norm: torch.Tensor | None = None
        self.last_step_comm_bytes = 0
        self.global_steps = 0
        self.comm.bytes_sent = 0
        # Threads and the swap file end with the engine, at the interpreter's exit at the latest (see
        # `teardown.py`). Nothing the finalizer holds may lead back to the engine.
        comms = [self.comm] + ([self.gather_comm] if config.stage == 3 else [])
        swap_file = self.swapper.file if self.swapper is not None else None
        self._release = weakref.finalize(self, release, comms, self._delayed, swap_file)
        release_before_teardown(self._release)

    # ---- set-up helpers ---------------------------------------------------------------------------

    def _broadcast_module_state(self, skip: PendingWeights | None = None) -> None:
        """Start every rank from the first rank's weights and buffers, as DistributedDataParallel does
        (weights still on disk excepted: every rank reads them from the same files)."""
        with torch.no_grad():
            for tensor in list(self.module.parameters()) + list(self.module.buffers()):
                if skip is None or tensor not in skip:
                    self.comm.broadcast(tensor.data)

    def _layout_segments(
        self,
        named: list[list],
        keep_fp32: set[int],
        trainable: bool = True,
        pending: PendingWeights | None = None,
    ) -> list[FlatParamGroup]:
        """The flat segments. At stage 3 (and with NVMe offload) one per (unit, param group,
        compute dtype), units in registration order, so a unit's parameters are laid out and
        gathered (or swapped) together. Below stage 3 one per (param group, compute dtype), in
        the param group's order, spanning units: its buckets follow `reduce_bucket_size` (as DDP's
        do), so the number of collectives and of kernel launches per step does not grow with the
        number of layers. Parameters of modules the
        model keeps in fp32 get fp32 segments; an empty param group gets one empty segment. Frozen
        weights (`trainable=False`, stage 3) form segments of their own, per unit and dtype. Weights
        still on disk (`pending`, stage 3) are read into the shards, each rank only its own part."""
        unit_of = {id(p): unit.index for unit in self.units for p in unit.params}
        dtypes = list(dict.fromkeys((self.compute_dtype, torch.float32)))
        # Below stage 3 every segment belongs to the root unit: units only decide what is gathered.
        # NVMe offload keeps per-unit segments: the step swaps whole segments through host buffers
        # sized by the largest one.
        spanning = self.config.stage < 3 and self.config.offload_optimizer != "nvme"
        units = self.units[:1] if spanning else self.units
        num_shards = 1 if self.config.stage == 0 else self.ctx.world_size
        specs = []  # (members, dtype, optimizer group, unit, layout)
        for unit in units:
            for index, pairs in enumerate(named):
                for dtype in dtypes:
                    members = [
                        (name, param)
                        for name, param in pairs
                        if (len(units) == 1 or unit_of[id(param)] == unit.index)
                        and (torch.float32 if id(param) in keep_fp32 else self.compute_dtype) == dtype
                    ]
                    if members or (trainable and unit.is_root and not pairs and dtype == self.compute_dtype):
                        layout = FlatLayout(
                            [name for name, _ in members],
                            [param.shape for _, param in members],
                            num_shards,
                            self.config.reduce_bucket_size,
                        )
                        specs.append((members, dtype, index if trainable else None, unit.index, layout))
        arenas = self._arenas(specs)
        return [self._segment(*spec, pending, into) for spec, into in zip(specs, arenas, strict=True)]

    def _arenas(self, specs: list) -> list[tuple[torch.Tensor | None, torch.Tensor | None]]:
        """Stage 3: where each segment's master shard and 16-bit shard live, as views carved from
        one allocation per kind and dtype (`arena.py`), the segments of each param group end to end,
        so the step and the gradient statistics run one launch per param group over all units.
        Page-locked where offloaded to CPU; NVMe offload maps its own (None: the segment allocates)."""
        if self.config.stage != 3 or not specs:
            return [(None, None)] * len(specs)
        order = [segment_order(group, dtype) for _, dtype, group, _, _ in specs]
        shards16: list[torch.Tensor | None] = [None] * len(specs)
        if self.config.offload_params != "nvme":
            shards16 = self._carve(
                [spec[4].shard_numel for spec in specs],
                [spec[1] for spec in specs],
                order,
                on_host=self.config.offload_params == "cpu",
            )
        masters: list[torch.Tensor | None] = [None] * len(specs)
        # An fp32 segment's shard is its master when both live on the device (FSDP2's sharded
        # parameter is, too): the update writes it in place and no second copy is kept.
        shared = self.config.offload_optimizer == "none" and self.config.offload_params == "none"
        for i, spec in enumerate(specs):
            if spec[2] is not None and shared and spec[1] == torch.float32:
                masters[i] = shards16[i]
        trainable = [i for i, spec in enumerate(specs) if spec[2] is not None and masters[i] is None]
        if trainable and self.config.offload_optimizer != "nvme":
            carved = self._carve(
                [specs[i][4].shard_numel for i in trainable],
                [torch.float32] * len(trainable),
                [order[i] for i in trainable],
                on_host=self.config.offload_optimizer == "cpu",
            )
            for i, view in zip(trainable, carved, strict=True):
                masters[i] = view
        return list(zip(masters, shards16, strict=True))

    def _carve(self, sizes: list[int], dtypes: list[torch.dtype], order: list, on_host: bool) -> list:
        """`carve_ordered` on the device, or in (page-locked) host memory."""
        if on_host:
            return carve_ordered(sizes, dtypes, order, torch.device("cpu"), self.device_ops.host_empty)
        return carve_ordered(sizes, dtypes, order, self.ctx.device)

    def _segment(
        self,
        members: list,
        dtype: torch.dtype,
        group: int | None,
        unit: int,
        layout: FlatLayout,
        pending: PendingWeights | None,
        into: tuple[torch.Tensor | None, torch.Tensor | None],
    ) -> FlatParamGroup:
        params = [param for _, param in members]
        read = (
            pending.values_of(params) if pending is not None and any(p in pending for p in params) else None
        )
        segment = FlatParamGroup(
            params,
            layout,
            self.ctx.rank,
            dtype,
            self.device_ops,
            group,
            unit,
            sharded_params=self.config.stage == 3,
            read=read,
            offload=self.config.offload_optimizer if group is not None else "none",
            offload_params=self.config.offload_params,
            into=into,
        )
        if self.config.offload_optimizer == "nvme" and group is not None:
            self.swapper.adopt(segment, state_keys(self.optimizer, self.optimizer.param_groups[group]))
        if self.config.offload_params == "nvme":
            self.swapper.adopt_params(segment)
        return segment

    def _open_swap(
        self, optimizer: torch.optim.Optimizer, named: list[list], frozen: list[list]
    ) -> NvmeSwapper:
        """NVMe offload: check the optimizer and the disk before anything is written, then open this
        rank's swap file (the segments move their masters, or 16-bit shards, into it as they are
        laid out)."""
        shards = 1 if self.config.stage == 0 else self.ctx.world_size
        needed = 0
        # Each segment pads each slot to the IO alignment: at most one block per slot and unit.
        padding = NVME_ALIGN * len(self.units)
        for group, pairs in zip(optimizer.param_groups, named, strict=True):
            elements = sum(-(-param.numel() // shards) for _, param in pairs)
            if self.config.offload_optimizer == "nvme":
                slots = 1 + len(state_keys(optimizer, group))  # refuses other optimizers by name
                if not supports_fused_step(optimizer, group):
                    # torch's own step would run after the swap took the segment's buffers back.
                    raise ValueError(
                        f"offload_optimizer='nvme' updates with hf_zero's fused kernels, which do not cover "
                        f"{type(optimizer).__name__} with these settings (amsgrad, maximize, capturable, "
                        "differentiable or tensor hyper-parameters); drop those, or use offload_optimizer='cpu'"
                    )
                needed += slots * (elements * 4 + padding)
            if self.config.offload_params == "nvme":
                needed += elements * self.compute_dtype.itemsize + padding
        if self.config.offload_params == "nvme":
            elements = sum(-(-param.numel() // shards) for pairs in frozen for _, param in pairs)
            needed += elements * self.compute_dtype.itemsize + padding
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        check_free_space(self.config.nvme_path, needed, min(local_ranks, self.ctx.world_size))
        return NvmeSwapper(
            self.config.nvme_path,
            self.ctx.rank,
            optimizer,
            self.config.nvme_buffer_count,
            self.device_ops,
        )

    def _cast_frozen_parameters(self, keep: set[int]) -> dict[int, torch.dtype]:
        """Frozen floating-point weights compute in the same dtype as the trainable ones (those of
        modules the model keeps in fp32 excepted); returns their original dtypes, which saving
        restores."""
        original = {}
        for param in self.module.parameters():
            if id(param) not in keep and param.is_floating_point() and param.dtype != self.compute_dtype:
                original[id(param)] = param.dtype
                param.data = param.data.to(self.compute_dtype)
        return original

    def _watch_first_forward(self) -> list:
        """Record the order in which the first forward uses the managed parameters and hand it
        to the stage-2 reducer, which launches its first backward's buckets in reverse."""
        slot_of = self.slot_of
        first_use: dict[tuple[int, int], int] = {}
        handles: list = []

        def record(owned: list[tuple[int, int]]):
            @torch.compiler.disable
            def hook(module: nn.Module, args: Any) -> None:
                for key in owned:
                    first_use.setdefault(key, len(first_use))

            return hook

        for submodule in self.module.modules():
            owned = [slot_of[id(p)] for p in submodule.parameters(recurse=False) if id(p) in slot_of]
            if owned:
                handles.append(submodule.register_forward_pre_hook(record(owned)))

        @torch.compiler.disable
        def done(module: nn.Module, args: Any, output: Any) -> None:
            for handle in handles:
                handle.remove()
            self.grad_sync.order_by_first_use(first_use)

        handles.append(self.module.register_forward_hook(done))
        return list(handles)

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
        """Release what the engine holds beyond memory: wait for the host update in flight
        (offload_overlap="delayed", whose weights then stay unpublished) and stop its thread, close
        the NVMe swap file, destroy the process group the engine made for stage-3 gathers. Not a
        collective, but call it on every rank once training, saving and evaluating are over: the
        engine runs no collective afterwards. Garbage collection and the interpreter's exit release
        the threads and file too; the gather group then ends with the default process group."""
        own_group = self.gather_comm.group_ref if self.gatherer is not None else None
        self._release()
        leave_group(own_group)

    def device_counts(self) -> dict[str, int]:
        """What this engine has asked of its device so far: host waits for all queued work or for a
        device value (`host_syncs`), waits for one recorded point (`event_waits`), and page-locked
        host bytes (`pinned_bytes`); see `device.py`. Compare two readings for a step's counts."""
        return self.device_ops.counts()

    def trace_collectives(self) -> list[tuple[str, str, int, int | None]]:
        """Start recording every collective this rank issues from now on, on all the engine's
        communicators in one list: `(operation, communicator, bytes, unit)` in issue order (see
        `rules_of_order.py`). Returns the list, which keeps growing; call again for a fresh one."""
        trace: list[tuple[str, str, int, int | None]] = []
        self.comm.trace = trace
        if self.gatherer is not None:
            self.gather_comm.trace = trace
        return trace

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Discard gradients accumulated since the last step (`optimizer.zero_grad()` and
        `model.zero_grad()` do the same)."""
        self.end_backward()
        self.grad_sync.discard()
        nn.Module.zero_grad(self.module, set_to_none=set_to_none)
        self.clear_optimizer_grads(set_to_none=set_to_none)
        self._reset_step_state()

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
            self._grad_scale = coefficient if self._grad_scale is None else self._grad_scale * coefficient
            self._clipped = True
        self.last_grad_norm = total
        return total

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

    def write_back(self, params: list[torch.Tensor], source: int, before: list[torch.Tensor] | None) -> None:
        """After `gathered_parameters(..., modifier_rank=source)`: every rank takes rank `source`'s
        values of the parameters it changed (`before` holds their values at the start, on that rank)
        into its copy, its shard and its masters. A collective."""
        located = {id(p): (g, i) for g in self.groups + self.frozen for i, p in enumerate(g.params)}
        flags = (
            [int(not torch.equal(p, b)) for p, b in zip(params, before, strict=True)]
            if before
            else [0] * len(params)
        )
        changed = torch.tensor(flags, dtype=torch.int64, device=self.ctx.device)
        self.comm.broadcast(changed, src=source)
        with torch.no_grad():
            for param, flag in zip(params, self.device_ops.to_host(changed).tolist(), strict=True):
                if flag and id(param) in located:
                    value = param.detach().clone()
                    self.comm.broadcast(value, src=source)
                    param.copy_(value)
                    group, index = located[id(param)]
                    group.set_master_values(index, value)

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

    # ---- optimizer step hooks ------------------------------------------------------------------

    def _reduce_grads(self, reason: str) -> None:
        if not self._grads_reduced:
            self.end_backward()
            self.grad_sync.reduce()
            self.grad_sync.closed_by = reason
            self._grads_reduced = True

    def _gradient_stats(self) -> torch.Tensor:
        """`[Σg², non-finite count]` of this step's reduced gradient (summed over ranks, still
        loss-scaled) on every rank, as a device tensor: one read of each owned shard and one
        all-reduce carrying both numbers. Measured once per step."""
        if self._stats is None:
            self._reduce_grads("clip_grad_norm_")
            # In arena order, where the segments' gradients sit end to end: one read per dtype.
            owned = [t for g in self.arena_order for t in self.grad_sync.owned_grads(g)]
            stats = grad_stats([row[0] for row in merge_adjacent([(t,) for t in owned])]).to(self.ctx.device)
            if any(group.layout.num_shards > 1 for group in self.groups):
                self.comm.all_reduce(stats)
            self._stats = stats
        return self._stats

    def _unscale_factor(self) -> torch.Tensor:
        """What turns the reduced gradient into the mean unscaled gradient: 1/world (the reduction
        sums), or under fp16 1/loss scale (`backward` divided the loss by the world size already)."""
        if self.loss_scaler is None:
            return self._inverse_world
        return torch.full((), 1.0 / self.loss_scaler.scale, device=self.ctx.device)

    def _reset_step_state(self) -> None:
        self._grads_reduced = False
        self._clipped = False
        self._grad_scale: torch.Tensor | None = None  # clip coefficient, on device
        self._stats: torch.Tensor | None = None  # see _gradient_stats
        self._found_inf: torch.Tensor | None = None  # fp16: nonzero when this step overflowed, on device
        self._skipped_on_host: bool | None = None  # `_found_inf` once the host has read it
        self._zeroed_in_kernel: set[int] = set()  # groups whose gradient the fused kernel zeroed
        self._fused_groups: set[int] = set()  # groups the fused kernel updated this step
        self._undo_if_skipped: list = []  # the fused steps' host bookkeeping, for a skipped step

    def _step_scale(self) -> torch.Tensor | None:
        """What the optimizer multiplies the reduced gradient by: `_unscale_factor` and the clip
        coefficient, as one device scalar (None: nothing to multiply by)."""
        if self.ctx.world_size == 1 and self.loss_scaler is None:
            return self._grad_scale
        if self._grad_scale is None:
            return self._unscale_factor()
        return self._grad_scale * self._unscale_factor()

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
        self._check_parameters_in_place()
        self._reduce_grads("the optimizer step")
        if self.config.gradient_clipping > 0 and not self._clipped:
            self.clip_grad_norm_(self.config.gradient_clipping)
        found_inf = self._found_inf = self._gradient_stats()[1:] if self.loss_scaler is not None else None
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
                self._fused_groups.add(g)
                if zero:
                    self._zeroed_in_kernel.add(g)
            elif skipped:
                group.master.grad = None  # torch's optimizers leave gradient-less parameters alone
            else:
                grad = torch.empty_like(group.master.data)
                for run in group.runs:
                    grad[run.shard_start : run.shard_start + run.length].copy_(
                        self.grad_sync.run_grad(g, run)
                    )
                group.master.grad = grad if scale is None else grad.mul_(scale)
        for (index, zero), parts in fused.items():
            self._undo_if_skipped.append(
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
            self._skipped_on_host = skipped
        return host_scale, skipped

    def _read_skip_flag(self, found_inf: torch.Tensor) -> bool:
        """Whether this step overflowed (fp16), read on the host once per step."""
        if self._skipped_on_host is None:
            self._skipped_on_host = bool(self.device_ops.read(found_inf))
        return self._skipped_on_host

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
            self._fused_groups.add(g)
            if not skipped:
                pieces = self.staging.pieces(group, lambda run: self.grad_sync.run_grad(g, run))
                self._undo_if_skipped.append(
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
        self._fused_groups.add(g)
        if skipped:
            return
        group.download_grads(lambda run: self.grad_sync.run_grad(g, run))
        # This segment's download has landed (the swapper brings segments in one after another).
        self.device_ops.record().synchronize()
        self._undo_if_skipped.append(
            fused_step(optimizer, param_group, [(group.master, group.host_pieces())], scale, False)
        )
        group.upload_weights()

    # ---- offload_overlap="delayed" -------------------------------------------------------------

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
            self._fused_groups.add(g)
        # The gradients have landed and the uploads have left `host_copy`, which the update rewrites.
        self.device_ops.synchronize()
        if skipped:
            return  # nothing to update: the device keeps its weights, the host its state
        # The update must not see what the LR scheduler sets for the next step meanwhile.
        jobs = [(dict(optimizer.param_groups[group.optimizer_group]), group) for group in self.groups]

        def update() -> None:
            for hyperparameters, group in jobs:
                fused_step(optimizer, hyperparameters, [(group.master, group.host_pieces())], scale, False)

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
            self._publish_masters()

    def _finish_update_before_eval(self, module: nn.Module, args: Any) -> None:
        if self._delayed_update is not None and not module.training:
            self.finish_delayed_update()

    def _after_optimizer_step(self, optimizer, args, kwargs) -> None:
        for g, group in enumerate(self.groups):
            if g not in self._fused_groups:
                group.master.grad = None
                group.round_master()
        for work in self.comm.all_gather_many([pair for group in self.groups for pair in group.publish()]):
            work.wait()
        self.grad_sync.clear_after_step(self._zeroed_in_kernel)
        # The one host read of the overflow flag, after every kernel and collective was issued
        # (unless the step read it before it queued them).
        skipped = self._found_inf is not None and self._read_skip_flag(self._found_inf)
        if skipped:
            for undo in self._undo_if_skipped:
                undo()
        self.last_step_skipped = skipped
        self._reset_step_state()
        self.global_steps += 1
        self.comm.check_fingerprint()
        self.last_step_comm_bytes = self.comm.bytes_sent
        self.comm.bytes_sent = 0
        if self.gatherer is not None:
            self.gatherer.release_all()  # anything still gathered now holds the old weights
            self.gather_comm.check_fingerprint()
            self.last_step_comm_bytes += self.gather_comm.bytes_sent
            self.gather_comm.bytes_sent = 0
        if self.swapper is not None:
            self.swapper.settle_params()  # offload_params="nvme": the new weights go to the file
        if self.loss_scaler is not None:
            self.loss_scaler.update(skipped)  # last: it raises when the scale cannot go lower


def initialize(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    config: ZeroConfig | dict | str | None = None,
    process_group: dist.ProcessGroup | None = None,
) -> ZeroEngine:
    """Shard `model` and `optimizer` per `config` and return the engine that trains them.

    `optimizer` is any elementwise torch optimizer built over `model.parameters()`; it keeps its
    class, param groups and hyper-parameters and becomes `engine.optimizer`, an optimizer over
    this rank's flat shards. Launch with torchrun (or accelerate launch) for several ranks; a plain
    `python` process is a world of one. `process_group` shards over that group of ranks only (the
    data-parallel group beside tensor or pipeline parallelism); by default, over every rank.
    """
    return ZeroEngine(model, optimizer, ZeroConfig.coerce(config), process_group)


def full_grad(param: torch.Tensor) -> torch.Tensor:
    """The complete rank-averaged fp32 gradient of a parameter trained by hf_zero (see
    `ZeroEngine.full_grad`); a collective every rank must call."""
    engine = user_paths.engine_of_parameter(param)
    if engine is None:
        raise ValueError("full_grad: this tensor is not a parameter trained by an hf_zero engine")
    return engine.full_grad(param)


# ---- module-level helpers ------------------------------------------------------------------------


def check_available(config: ZeroConfig) -> None:
    """Raise a clear error for a config that cannot run on this machine: a precision with no
    compute dtype, an NVMe offload folder that does not exist.

    The integrations call it when they are built, so a Trainer or Accelerator refuses such a
    config at once rather than when training starts.
    """
    compute_dtype_for(config.precision)
    if "nvme" in (config.offload_optimizer, config.offload_params):
        existing_folder(config.nvme_path)


def _take_pending_weights(module: nn.Module) -> PendingWeights | None:
    """The weights of `module` still on disk (see `hf_zero.from_pretrained`), taken off the model.

    A tensor on the meta device with no file behind it has no value anywhere, and is refused by name.
    """
    pending = PendingWeights.take(module)
    if pending is not None:
        initialise_new_adapters(module, pending)
    empty = [
        name for name, p in module.named_parameters() if p.is_meta and (pending is None or p not in pending)
    ]
    empty += [name for name, b in module.named_buffers() if b.is_meta]
    if empty:
        raise ValueError(
            f"{empty[:3]} of the model are on the meta device with no values: hf_zero cannot shard tensors that "
            "hold nothing. Load pretrained weights with hf_zero.from_pretrained, or give those tensors values "
            "(e.g. model.to_empty(device='cpu') and the model's weight initialisation) before initialize"
        )
    return pending
