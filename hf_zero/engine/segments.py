"""How the engine lays the model out: the flat segments of each param group (per unit at stage 3),
the arenas their shards are carved from, frozen weights cast to the compute dtype, the NVMe swap
file opened before anything is written, and the first rank's weights broadcast to all.

`SegmentSetup` is a part of `ZeroEngine` (a mixin): its methods run once, from the engine's
constructor, and read the engine's `config`, `ctx`, `units`, `module` and `device_ops`.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from ..config.precision import compute_dtype_for
from ..config.zero_config import ZeroConfig
from ..core.arena import carve_ordered, segment_order
from ..core.flat_group import FlatParamGroup
from ..core.layout import FlatLayout
from ..hub.pending import PendingWeights, initialise_new_adapters
from ..offload.nvme import ALIGN as NVME_ALIGN
from ..offload.nvme import NvmeSwapper, check_free_space, existing_folder, state_keys
from .fused_step import supports_fused_step


class SegmentSetup:
    """The engine's set-up steps that lay out segments and the memory behind them."""

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


def take_pending_weights(module: nn.Module) -> PendingWeights | None:
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


def check_available(config: ZeroConfig) -> None:
    """Raise a clear error for a config that cannot run on this machine: a precision with no
    compute dtype, an NVMe offload folder that does not exist.

    The integrations call it when they are built, so a Trainer or Accelerator refuses such a
    config at once rather than when training starts.
    """
    compute_dtype_for(config.precision)
    if "nvme" in (config.offload_optimizer, config.offload_params):
        existing_folder(config.nvme_path)
