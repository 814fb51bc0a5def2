"""Process-group set-up and the collectives the engine uses, with a count of bytes sent.

A single process without an initialised process group is world size 1: every collective is then
a local copy (or nothing), so the same engine code runs under `python`, `torchrun` and
`accelerate launch`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

# torch >= 2.12 renamed the single-tensor collectives; older releases only have the old names.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


@dataclass(frozen=True)
class DistContext:
    """Where this process sits: its rank, the world size, and the device it computes on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    group: dist.ProcessGroup | None


def setup_distributed(model_device: torch.device | None = None) -> DistContext:
    """Join (or start, under torchrun) the default process group and pick this rank's device.

    NCCL is used when CUDA is available and gloo otherwise. Without a launcher (no WORLD_SIZE
    in the environment) this process is a world of one and no process group is created.
    """
    use_cuda = torch.cuda.is_available() and (model_device is None or model_device.type != "cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_available() and not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    if dist.is_available() and dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
        group = dist.group.WORLD
    else:
        rank, world_size, group = 0, 1, None
    if use_cuda:
        if model_device is not None and model_device.type == "cuda" and model_device.index is not None:
            device = model_device
        else:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device, group=group)


class _Done:
    """Stands in for a finished collective's work handle."""

    def wait(self) -> bool:
        return True


class Collectives:
    """The collectives of one process group, counting the bytes this rank sends.

    The count follows the ring algorithms NCCL and gloo use for large messages: a reduce-scatter
    or all-gather over n elements sends (W-1)/W of them, an all-reduce twice that. So one
    all-reduce of the gradients costs what a reduce-scatter plus an all-gather of them costs,
    which is the claim ZeRO stages 1 and 2 rest on.
    """

    def __init__(self, ctx: DistContext) -> None:
        self.world_size = ctx.world_size
        self.group = ctx.group
        self.bytes_sent = 0

    def _count(self, numel: int, element_size: int, factor: float) -> None:
        self.bytes_sent += round(numel * element_size * factor * (self.world_size - 1) / self.world_size)

    def all_reduce(self, tensor: torch.Tensor, async_op: bool = False):
        """Sum `tensor` over ranks, in place."""
        if self.world_size == 1:
            return _Done()
        self._count(tensor.numel(), tensor.element_size(), 2.0)
        return dist.all_reduce(tensor, group=self.group, async_op=async_op) or _Done()

    def reduce_scatter(self, output: torch.Tensor, input: torch.Tensor, async_op: bool = False):
        """Sum `input` over ranks and leave chunk `rank` of the sum in `output`."""
        if self.world_size == 1:
            if output.data_ptr() != input.data_ptr():
                output.copy_(input)
            return _Done()
        self._count(input.numel(), input.element_size(), 1.0)
        return _reduce_scatter_single(output, input, group=self.group, async_op=async_op) or _Done()

    def all_gather(self, output: torch.Tensor, input: torch.Tensor, async_op: bool = False):
        """Concatenate every rank's `input` into `output` (in place when `input` is this rank's chunk)."""
        if self.world_size == 1:
            if output.data_ptr() != input.data_ptr():
                output.copy_(input)
            return _Done()
        self._count(output.numel(), output.element_size(), 1.0)
        return _all_gather_single(output, input, group=self.group, async_op=async_op) or _Done()

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> None:
        """Copy rank `src`'s `tensor` to every rank."""
        if self.world_size == 1:
            return
        self.bytes_sent += tensor.numel() * tensor.element_size()
        dist.broadcast(tensor, src=src, group=self.group)
