"""Which rank owns each whole parameter of an optimizer that needs whole tensors (Muon's
Newton–Schulz, Adafactor's factored moments), and how the pieces of those parameters travel
between the ranks' flat shards and their owners (`OwnerPlan`).

Owners are balanced by the cost of the work only an owner does: for Newton–Schulz on an m×n
matrix, which multiplies an s×s Gram matrix (s = min(m, n)) into the m×n one, m·n·min(m, n).
They are chosen by longest processing time first: the most expensive parameter goes to the rank
with the least work so far (ties: the lower rank), so every rank computes the same assignment
from the shapes alone.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from .distributed import Collectives
from .flat_group import FlatParamGroup


def newton_schulz_cost(shape: Sequence[int]) -> int:
    """Multiply-adds of one Newton–Schulz iteration on a matrix of `shape`, up to a constant."""
    rows, cols = int(shape[0]), int(torch.Size(shape[1:]).numel())
    return rows * cols * min(rows, cols)


def balance_owners(costs: Sequence[int], num_ranks: int) -> list[int]:
    """An owner rank for each cost, spreading the total as evenly as longest-first allows."""
    heap = [(0, rank) for rank in range(num_ranks)]
    owners = [0] * len(costs)
    for index in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        load, rank = heapq.heappop(heap)
        owners[index] = rank
        heapq.heappush(heap, (load + costs[index], rank))
    return owners


def owner_spread(costs: Sequence[int], owners: Sequence[int], num_ranks: int) -> float:
    """Most-loaded rank's work over the mean (1.0: perfectly even)."""
    loads = [0] * num_ranks
    for cost, owner in zip(costs, owners, strict=True):
        loads[owner] += cost
    total = sum(loads)
    return max(loads) * num_ranks / total if total else 1.0


@dataclass(frozen=True)
class _Piece:
    """Elements `param_begin ..` of matrix `matrix`, found at `shard_begin ..` of segment
    `segment`'s shard on the rank that holds them."""

    matrix: int
    segment: int
    param_begin: int
    shard_begin: int
    length: int


class OwnerPlan:
    """Which rank owns each whole parameter of `segments` (segment index -> segment) and how their
    pieces travel between the ranks' shards and the owners: every rank builds the same plan from
    the layouts. `cost(shape)` is the work only an owner does, which the owners share evenly."""

    def __init__(
        self, segments: Mapping[int, FlatParamGroup], comm: Collectives, cost=newton_schulz_cost
    ) -> None:
        self.comm = comm
        self.segments = dict(segments)
        # Stage 0 keeps whole parameters on every rank: each rank owns them all.
        first = next(iter(self.segments.values()))
        self.num_shards, self.rank = first.layout.num_shards, first.rank
        self.matrices = [
            (g, slot) for g, segment in self.segments.items() for slot in range(len(segment.params))
        ]
        self.index = {key: k for k, key in enumerate(self.matrices)}
        self.shapes = [self.segments[g].layout.slots[slot].shape for g, slot in self.matrices]
        self.costs = [cost(s) for s in self.shapes]
        self.owners = balance_owners(self.costs, self.num_shards)
        pieces: list[list[list[_Piece]]] = [[[] for _ in self.matrices] for _ in range(self.num_shards)]
        for rank in range(self.num_shards):
            for g, segment in self.segments.items():
                for span in segment.layout.spans(rank):
                    k = self.index[(g, span.slot)]
                    pieces[rank][k].append(_Piece(k, g, span.param_begin, span.shard_begin, span.length))
        owned = [k for k, owner in enumerate(self.owners) if owner == self.rank]
        # What this rank sends (its pieces of each owner's matrices, owner by owner) and receives
        # (every rank's pieces of the matrices it owns, rank by rank); the way back swaps the two.
        self.sends: list[_Piece] = []
        self.send_counts = []
        for owner in range(self.num_shards):
            mine = [
                p for k, owner_k in enumerate(self.owners) if owner_k == owner for p in pieces[self.rank][k]
            ]
            self.sends += mine
            self.send_counts.append(sum(p.length for p in mine))
        self.receives: list[_Piece] = []
        self.receive_counts = []
        for source in range(self.num_shards):
            theirs = [p for k in owned for p in pieces[source][k]]
            self.receives += theirs
            self.receive_counts.append(sum(p.length for p in theirs))
        self.owned = owned
        # Elements every rank moves together per all-to-all: the same number on every rank.
        self.total_elements = sum(s.numel() for s in self.shapes)

    def to_owners(self, shards: Mapping[int, torch.Tensor], dtype: torch.dtype) -> dict[int, torch.Tensor]:
        """Each owned parameter whole (in `dtype`), from every rank's pieces of `shards[g]`, segment
        g's shard-shaped tensor: one all-to-all."""
        pieces = [shards[p.segment][p.shard_begin : p.shard_begin + p.length].to(dtype) for p in self.sends]
        received = self._exchange(pieces, self.receive_counts, self.send_counts, dtype)
        whole = {k: torch.empty(self.shapes[k], dtype=dtype, device=received.device) for k in self.owned}
        offset = 0
        for p in self.receives:
            whole[p.matrix].view(-1)[p.param_begin : p.param_begin + p.length].copy_(
                received[offset : offset + p.length]
            )
            offset += p.length
        return whole

    def from_owners(
        self, whole: Mapping[int, torch.Tensor], dtype: torch.dtype
    ) -> list[tuple[_Piece, torch.Tensor]]:
        """Each rank's pieces of the owned parameters `whole[k]`: one all-to-all; returns, for every
        piece of this rank's shards, the values that belong there."""
        flat = {k: tensor.reshape(-1) for k, tensor in whole.items()}
        pieces = [flat[p.matrix][p.param_begin : p.param_begin + p.length] for p in self.receives]
        returned = self._exchange(pieces, self.send_counts, self.receive_counts, dtype)
        values, offset = [], 0
        for p in self.sends:
            values.append((p, returned[offset : offset + p.length]))
            offset += p.length
        return values

    def _exchange(
        self,
        pieces: list[torch.Tensor],
        receive_counts: list[int],
        send_counts: list[int],
        dtype: torch.dtype,
    ) -> torch.Tensor:
        device = next(iter(self.segments.values())).master.device
        send = torch.cat(pieces) if pieces else torch.empty(0, dtype=dtype, device=device)
        if self.num_shards == 1:
            return send
        received = torch.empty(sum(receive_counts), dtype=dtype, device=device)
        self.comm.all_to_all(received, send, receive_counts, send_counts, self.total_elements)
        return received

    def spread(self) -> float:
        """The most-loaded rank's owner work over the mean (1.0: even)."""
        return owner_spread(self.costs, self.owners, self.num_shards)
