"""Which rank owns each whole matrix of a matrix optimizer (Muon): owners balanced by the cost of
the work only an owner can do, Newton–Schulz on the whole matrix.

A Newton–Schulz iteration on an m×n matrix multiplies an s×s Gram matrix (s = min(m, n)) into the
m×n one: its cost grows as m·n·min(m, n). Owners are chosen by longest processing time first:
the most expensive matrix goes to the rank with the least work so far (ties: the lower rank), so
every rank computes the same assignment from the shapes alone.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

import torch


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
