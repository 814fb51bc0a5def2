"""Muon on flat shards: each element's momentum and update where the element lives, and each
matrix's Newton–Schulz orthogonalisation at the one rank that owns it.

Muon's update of a matrix W with gradient G is, in torch's own order (`torch.optim.Muon`):
`B ← lerp(B, G, 1 − μ)`, `U ← lerp(G, B, μ)` (Nesterov) or `B`, `O ← NS(bf16(U))`,
`W ← W·(1 − lr·λ) − lr'·O` with `lr'` adjusted to the matrix's shape. Everything but NS is
elementwise, so the momentum B and the master W stay in the rank's flat fp32 shards with the rest
of the optimizer state (1/N of it per rank, resharded like any elementwise state when a checkpoint
is loaded on another number of ranks). NS needs the whole matrix: one all-to-all sends every
rank's pieces of U (in bf16, the precision NS starts from, so nothing is lost) to the matrix's
owner, the owner runs torch's own NS on the whole matrix, and a second all-to-all returns each
rank its pieces of O. Owners are balanced by the cost of NS (`core/owners.py`), so each rank does
1/N of the orthogonalisation work instead of all of it, and no shard carries padding: unlike a
layout where the owner keeps the whole matrix, stage 3 shards stay even and unit-sized.

Both all-to-alls run inside the optimizer step on the main communicator, in the same canonical
matrix order on every rank (the rules of order hold: `rules_of_order.py`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..core.distributed import Collectives
from ..core.flat_group import FlatParamGroup
from ..core.owners import balance_owners, newton_schulz_cost, owner_spread

try:  # torch's own numerics, the very functions torch.optim.Muon calls
    from torch.optim._muon import _adjust_lr, _zeropower_via_newtonschulz
except ImportError:  # torch < 2.9 has no Muon; a later one that moved these: see `is_muon`
    _adjust_lr = _zeropower_via_newtonschulz = None

MUON = getattr(torch.optim, "Muon", None)


def is_muon(optimizer: torch.optim.Optimizer) -> bool:
    """Whether `optimizer` is torch's Muon (whose step hf_zero runs itself, see this module)."""
    if MUON is None or type(optimizer) is not MUON:
        return False
    if _zeropower_via_newtonschulz is None:  # torch moved the functions its Muon calls
        raise RuntimeError(
            f"hf_zero runs torch.optim.Muon with the Newton–Schulz function torch's Muon calls "
            f"(torch.optim._muon._zeropower_via_newtonschulz), which torch {torch.__version__} does not have; "
            "use the torch version hf_zero was tested with (see .ci/constraints.txt)"
        )
    return True


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
        index = {key: k for k, key in enumerate(self.matrices)}
        self.shapes = [self.segments[g].layout.slots[slot].shape for g, slot in self.matrices]
        self.costs = [cost(s) for s in self.shapes]
        self.owners = balance_owners(self.costs, self.num_shards)
        pieces: list[list[list[_Piece]]] = [[[] for _ in self.matrices] for _ in range(self.num_shards)]
        for rank in range(self.num_shards):
            for g, segment in self.segments.items():
                for span in segment.layout.spans(rank):
                    k = index[(g, span.slot)]
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


class MatrixStep(OwnerPlan):
    """The Muon update of the segments of Muon's param groups (see the module docstring)."""

    def step(
        self,
        optimizer: torch.optim.Optimizer,
        groups: Mapping[int, dict],
        grads: Mapping[int, torch.Tensor],
    ) -> None:
        """Update every segment's master with Muon; `grads[g]` is segment g's reduced, unscaled and
        clipped gradient shard in fp32, `groups[g]` its param group (hyper-parameters)."""
        updates: dict[int, torch.Tensor] = {}
        for g, segment in self.segments.items():
            group, grad = groups[g], grads[g]
            state = optimizer.state[segment.master]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(segment.master.data)
            buffer = state["momentum_buffer"]
            momentum = group["momentum"]
            buffer.lerp_(grad, 1 - momentum)
            update = grad.lerp(buffer, momentum) if group["nesterov"] else buffer
            updates[g] = update.bfloat16()  # NS starts from bf16 of the update: exact to send so
        whole = self.to_owners(updates, torch.bfloat16)
        for k, matrix in whole.items():
            group = groups[self.matrices[k][0]]
            whole[k] = _zeropower_via_newtonschulz(
                matrix, group["ns_coefficients"], group["ns_steps"], group["eps"]
            )
        returned = self.from_owners(whole, torch.bfloat16)
        for g, segment in self.segments.items():
            lr, decay = _scalar(groups[g]["lr"]), groups[g]["weight_decay"]
            segment.master.data.mul_(1 - lr * decay)
        for p, values in returned:
            group = groups[p.segment]
            lr = _adjust_lr(_scalar(group["lr"]), group["adjust_lr_fn"], self.shapes[p.matrix])
            target = self.segments[p.segment].master.data[p.shard_begin : p.shard_begin + p.length]
            target.add_(values, alpha=-lr)


def _scalar(value) -> float:
    return value.item() if torch.is_tensor(value) else value
