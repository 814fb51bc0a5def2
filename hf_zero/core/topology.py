"""Which ranks share a node: what ZeRO++'s node-local collectives (hpZ's secondary partition, qgZ's
hierarchical reduction) and the estimate's cross-node figures follow.

Nodes are runs of consecutive ranks, as torchrun and accelerate number them (`RANK = node *
LOCAL_WORLD_SIZE + LOCAL_RANK`). The node size comes from `ZeroConfig.node_size`, else the launcher's
`LOCAL_WORLD_SIZE`, else every rank is on one node; so 4 gloo ranks on one machine run as 2 nodes
× 2 with `node_size=2`.
"""

from __future__ import annotations

import os
import weakref
from dataclasses import dataclass

import torch.distributed as dist

from .distributed import DistContext


@dataclass(frozen=True)
class Topology:
    """`world_size` ranks in nodes of `node_size` consecutive ranks; `rank` is this process's."""

    world_size: int
    node_size: int
    rank: int

    def __post_init__(self) -> None:
        if self.node_size < 1 or self.world_size % self.node_size:
            raise ValueError(
                f"hf_zero topology: {self.node_size} ranks per node do not divide the world size "
                f"{self.world_size}; set ZeroConfig.node_size (or LOCAL_WORLD_SIZE) to a divisor of it"
            )

    @property
    def nodes(self) -> int:
        return self.world_size // self.node_size

    @property
    def node(self) -> int:
        """This rank's node."""
        return self.rank // self.node_size

    @property
    def local_rank(self) -> int:
        """This rank's place in its node."""
        return self.rank % self.node_size

    def node_ranks(self, node: int) -> list[int]:
        """The ranks of node `node`."""
        return list(range(node * self.node_size, (node + 1) * self.node_size))

    def peer_ranks(self, local_rank: int) -> list[int]:
        """The ranks at place `local_rank` of every node, in node order."""
        return list(range(local_rank, self.world_size, self.node_size))


def node_size_from(config_value: int | None, world_size: int) -> int:
    """Ranks per node: the config's value, else LOCAL_WORLD_SIZE, else the whole world."""
    if config_value is not None:
        return config_value
    launched = os.environ.get("LOCAL_WORLD_SIZE")
    if launched and launched.isdigit() and int(launched) > 0:
        return min(int(launched), world_size)
    return world_size


def subgroups(ctx: DistContext, partitions: list[list[int]]) -> DistContext:
    """Split the engine's ranks into `partitions` (lists of ranks of the engine's group, together
    covering it), one process group each; returns this rank's, as a context.

    Every rank creates every group, in the same order (torch requires it of groups created by all
    ranks), which holds where the engine's group is the whole world: a sub-group is refused."""
    if ctx.world_size == 1:
        return ctx
    members = dist.get_process_group_ranks(ctx.group)
    if len(members) != dist.get_world_size():
        raise ValueError(
            "hf_zero's node-local collectives (hpz_partition_size, quantized_gradients) need the engine to "
            "shard over every process (the default group); it was given a sub-group of "
            f"{len(members)} of {dist.get_world_size()} processes"
        )
    mine = None
    for ranks in partitions:
        group = dist.new_group(ranks=[members[r] for r in ranks])
        if ctx.rank in ranks:
            mine = DistContext(
                rank=ranks.index(ctx.rank),
                world_size=len(ranks),
                local_rank=ctx.local_rank,
                device=ctx.device,
                group_ref=weakref.ref(group) if len(ranks) > 1 else None,
            )
    assert mine is not None, "the partitions must cover every rank"
    return mine
