"""The engine's weights and training state: complete fp32 weights gathered from the shards,
loading them back, one rank's edits written back everywhere (`gathered_parameters`), checkpoints
(see `hf_zero.checkpoint`), and what the engine allocated. Mixed into `ZeroEngine`."""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..core.arena import nbytes


def _engine_call(name: str):
    """Label the method's collectives with the engine call `name` in a hang report."""

    def decorate(method):
        @functools.wraps(method)
        def labelled(self, *args: Any, **kwargs: Any):
            with self.watch.engine_call(name):
                return method(self, *args, **kwargs)

        return labelled

    return decorate


class ShardedState:
    """State methods of `ZeroEngine` (which supplies `groups`, `module`, `optimizer`, `comm`,
    `device_ops`, `ctx`, `config`, `grad_sync`, `compute_dtype` and `frozen_dtypes`)."""

    @_engine_call("full_state_dict")
    def full_state_dict(self, keep: bool = True, trainable_only: bool = False) -> dict[str, torch.Tensor]:
        """The complete, unsharded state dict on every rank, as CPU tensors.

        Trainable weights come from the fp32 master copy, cast back to the dtype the model had
        when it was handed to the engine; frozen weights and buffers are copied as they are (a
        frozen fp32 weight computing in 16 bits is saved from its 16-bit value, in fp32). Tied
        weights map to one shared tensor. Every rank must call this (it all-gathers); a rank that
        passes `keep=False` only takes part and gets an empty dict, holding no host copy. With
        `trainable_only`, frozen weights and buffers are left out (a PEFT adapter's save needs
        only its own weights, not a host copy of the frozen base model).

        `model.state_dict()` itself keeps returning what the model computes with (the 16-bit
        weights): the fp32 masters are spread over the ranks, and gathering them is a collective
        every rank must join, which a `state_dict()` call made on one rank cannot do.
        """
        values: dict[int, torch.Tensor] = {}
        # Stage 3 keeps frozen weights in shards too: those are gathered from their 16-bit values.
        for group in self.groups + ([] if trainable_only else self.frozen):
            values.update((id(param), full) for param, full in self.gather_segment(group, keep))
        if not keep:
            return {}
        state = {}
        for name, tensor in self.module.state_dict(keep_vars=True).items():
            found = values.get(id(tensor))
            if found is not None:
                state[name] = found
            elif not trainable_only:
                state[name] = self.host_copy(tensor)
        return state

    def gather_segment(self, group: Any, keep: bool = True) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(parameter, its complete value as a CPU tensor in the dtype the model had when handed to
        the engine) for every parameter of segment `group`: from the fp32 masters, or a frozen
        stage-3 segment's 16-bit values. A collective; ranks with `keep=False` get an empty list."""
        if self.swapper is not None:
            self.swapper.check_usable()  # a failed NVMe write leaves masters no one should publish
        self.finish_delayed_update()
        gathered = group.gather_master(self.comm, keep)
        return [
            (param, full.to(dtype))
            for param, dtype, full in zip(group.params, group.original_dtypes, gathered, strict=keep)
        ]

    def host_copy(self, tensor: torch.Tensor) -> torch.Tensor:
        """A CPU copy of a tensor the engine keeps whole (a buffer; below stage 3 a frozen weight),
        in the dtype it is saved in."""
        return tensor.detach().to("cpu", self.frozen_dtypes.get(id(tensor), tensor.dtype), copy=True)

    @_engine_call("save_checkpoint")
    def save_checkpoint(
        self, directory: str | os.PathLike, include_frozen: bool = True, asynchronous: bool | None = None
    ) -> Path:
        """Write this engine's training state as a sharded safetensors checkpoint folder: each rank's
        fp32 masters and optimizer state, frozen weights and buffers, and a JSON manifest (see
        `hf_zero.checkpoint`). The folder appears complete or not at all. Every rank must call it.
        With `include_frozen=False` frozen weights are left out (an adapter run's base model).

        `asynchronous` (default: `ZeroConfig.async_checkpoints`) returns once this rank's part is
        copied into host buffers; a background thread writes and finishes the checkpoint (see
        `hf_zero.checkpoint.background`). The next save, a load, `close()` and
        `wait_for_checkpoint()` wait for it, and raise its error on every rank if it failed."""
        from ..checkpoint import save_checkpoint

        self.wait_for_checkpoint()  # one save in flight at a time: the snapshot buffers are reused
        if self.swapper is not None:
            self.swapper.check_usable()
        self.finish_delayed_update()
        if asynchronous is None:
            asynchronous = self.config.async_checkpoints
        return save_checkpoint(
            self, directory, include_frozen, self.background_saves if asynchronous else None
        )

    def wait_for_checkpoint(self) -> Path | None:
        """Wait until the asynchronous checkpoint in flight is complete; returns its folder (None
        when none is in flight). Raises, on every rank alike, the error that stopped it."""
        return self.background_saves.wait()

    @_engine_call("load_checkpoint")
    def load_checkpoint(
        self, directory: str | os.PathLike, restore_rng: bool = True, verify: bool = True
    ) -> dict[str, Any]:
        """Restore what `save_checkpoint` wrote, on any number of ranks and at any stage (each rank
        reads only the elements its shard needs); returns the checkpoint's manifest. The manifest
        and the files' checksums are checked first, and nothing changes if a check fails. Every
        rank must call it. `restore_rng` sets each rank's random generators as saved (when the
        number of ranks is the same). An asynchronous save in flight is waited for first."""
        from ..checkpoint import load_checkpoint

        self.wait_for_checkpoint()
        self.finish_delayed_update()  # nothing may land on top of what it loads

        return load_checkpoint(self, directory, restore_rng, verify)

    def memory_breakdown(self) -> dict[str, int]:
        """Bytes of the persistent tensors the engine allocated on the device, by kind, read off
        the tensors themselves: 16-bit weights (at stage 3 this rank's shards, frozen ones
        included), fp32 masters, gradients, optimizer state, and the most gradient staging (stages
        2 and 3) and gathered parameters (stage 3) held at once so far. With optimizer offload,
        `offloaded` counts what lives in host memory instead: masters, optimizer state and the host
        gradient and weight buffers; with NVMe offload, the step's host buffers, and `nvme` the
        swap file (masters and optimizer state). `pinned` is the host memory of those that is
        page-locked on a GPU (on the CPU: what would be). `hpz_secondary` is ZeRO++ hpZ's copy of
        the layer units' 16-bit weights, split over the node."""
        breakdown = {"weights": 0, "masters": 0, "offloaded": 0}
        for group in self.groups + self.frozen:
            for kind, size in group.state_bytes().items():
                breakdown[kind] += size
        breakdown["gradients"] = self.grad_sync.persistent_bytes()
        offloaded = {id(group.master) for group in self.groups if group.offload == "cpu"}
        breakdown["optimizer_state"] = 0
        on_disk = {id(group.master) for group in self.groups if group.offload == "nvme"}
        breakdown["offloaded"] += self.staging.nbytes
        if self.swapper is not None:
            breakdown["offloaded"] += self.swapper.host_bytes
            breakdown["nvme"] = self.swapper.file_bytes
        for master, state in self.optimizer.state.items():
            if id(master) in on_disk:
                continue
            size = sum(
                nbytes(value)
                for value in state.values()
                if torch.is_tensor(value)
                and value.dim() > 0
                and (id(master) in offloaded or value.device == self.ctx.device)
            )
            breakdown["offloaded" if id(master) in offloaded else "optimizer_state"] += size
        if self.whole_step is not None:  # state kept whole at the parameters' owners
            breakdown["optimizer_state"] += self.whole_step.state_bytes()
        breakdown["peak_staging"] = getattr(self.grad_sync, "peak_staged_bytes", 0)
        breakdown["peak_gathered"] = self.gatherer.peak_gathered_bytes if self.gatherer is not None else 0
        breakdown["pinned"] = self.device_ops.pinned_bytes
        secondary = self.zeropp.secondary if self.zeropp is not None else None
        breakdown["hpz_secondary"] = secondary.nbytes if secondary is not None else 0
        return breakdown

    @_engine_call("load_full_state_dict")
    def load_full_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Load complete, unsharded weights (such as a `save_pretrained` folder's) on every rank.

        Trainable weights set the fp32 master shards exactly and reach the model rounded to the
        compute dtype; other entries (frozen weights, buffers) load into the model. A tied weight
        may appear under any of its names. Everything is checked before anything changes. Every
        rank must call this with the same weights.
        """
        self.finish_delayed_update()
        module_state = self.module.state_dict(keep_vars=True)
        names_of: dict[int, list[str]] = {}
        for name, tensor in module_state.items():
            names_of.setdefault(id(tensor), []).append(name)
        managed: set[str] = set()
        planned = []
        for group in self.groups:
            values = []
            for param, slot in zip(group.params, group.layout.slots, strict=True):
                names = names_of.get(id(param), [slot.name])
                managed.update(names)
                value = next((state_dict[n] for n in names if n in state_dict), None)
                if value is None:
                    raise ValueError(f"the weights to load have no entry for parameter {' / '.join(names)}")
                if tuple(value.shape) != tuple(slot.shape):
                    raise ValueError(
                        f"parameter {slot.name} has shape {tuple(slot.shape)} but the weights to load "
                        f"hold {tuple(value.shape)}"
                    )
                values.append(value)
            planned.append((group, values))
        rest = {name: value for name, value in state_dict.items() if name not in managed}
        expected = [name for name in module_state if name not in managed]
        missing = [name for name in expected if name not in rest]
        unexpected = [name for name in rest if name not in expected]
        if missing:
            raise ValueError(f"the weights to load have no entry for {missing[:5]}")
        if unexpected:
            raise ValueError(f"the weights to load hold entries the model does not have: {unexpected[:5]}")
        with torch.no_grad():
            for group, values in planned:
                group.master.copy_(
                    group.layout.shard_of(values, group.rank, torch.float32, group.master.device)
                )
            self.publish_masters()
            self.module.load_state_dict(rest, strict=False)

    def publish_masters(self) -> None:
        """Round every master shard into the compute buffer and all-gather it everywhere."""
        for group in self.groups:
            group.round_master()
        for work in self.comm.all_gather_many([pair for group in self.groups for pair in group.publish()]):
            work.wait()

    @_engine_call("write_back")
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
