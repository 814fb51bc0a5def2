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

import torch

from ..core.owners import OwnerPlan

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
