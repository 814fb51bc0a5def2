"""Launched by the rules-of-order test: do all ranks issue the same collectives, in the same
interleaving across communicators, when their data take different paths through the model?

    torchrun --nproc_per_node 2 -m hf_zero.testing.order_checks OUT.json

Three models of six layer units each (`Block`), with an embedding and a head in the root unit:
- `last-branch`: the last block has a branch that only rank 0's data take, so its parameters get a
  gradient on rank 0 and none on rank 1;
- `moe`: every block sends each token to one of four experts by its token id, and rank 1's tokens
  reach experts 0 and 1 only, so experts 2 and 3 get no tokens there;
- `skip`: rank 1's data skip blocks 2 and 3 altogether.
Each trains 3 steps of 2 micro-batches at stage 2 and stage 3, with `overlap_comm` on and off, and at
stage 3 with prefetching on and off, recording every collective (`ZeroEngine.trace_collectives`);
`last-branch` and `moe` also with Muon for the blocks' matrices (its all-to-alls in the step), and
each scenario with ZeRO++'s options (`ZEROPP`).
Rank 0 writes, per case, every rank's trace and where the traces first differ
(`rules_of_order.first_difference`).
"""

from __future__ import annotations

import json
import sys
from typing import ClassVar

import torch
import torch.distributed as dist
from torch import nn

import hf_zero
from hf_zero.engine.rules_of_order import first_difference

from .launch import exit_cleanly

VOCAB = 64
WIDTH = 16
BLOCKS = 6
EXPERTS = 4


class Block(nn.Module):
    """A residual layer with an extra branch that route 0 only takes, or experts chosen by token."""

    def __init__(self, branches: int = 1, experts: int = 0) -> None:
        super().__init__()
        self.inner = nn.Linear(WIDTH, WIDTH)
        self.branches = nn.ModuleList(nn.Linear(WIDTH, WIDTH) for _ in range(branches))
        self.experts = nn.ModuleList(nn.Linear(WIDTH, WIDTH) for _ in range(experts))

    def forward(self, hidden: torch.Tensor, route: int, expert_of: torch.Tensor) -> torch.Tensor:
        update = torch.tanh(self.inner(hidden))
        if route == 0 and len(self.branches) > 1:
            update = self.branches[1](update)  # an extra branch on route 0 only
        update = self.branches[0](update)
        if len(self.experts):
            mixed = torch.zeros_like(update)
            for index, expert in enumerate(self.experts):
                chosen = expert_of == index
                if chosen.any():  # an expert without tokens does not run, as in real MoE layers
                    mixed[chosen] = expert(update[chosen])
            update = mixed
        return hidden + update


class DivergentNet(nn.Module):
    """Embedding, six `Block` units, a head; what each rank runs depends on its data."""

    _no_split_modules: ClassVar[list[str]] = ["Block"]

    def __init__(self, scenario: str) -> None:
        super().__init__()
        self.scenario = scenario
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.blocks = nn.ModuleList(
            Block(
                branches=2 if scenario == "last-branch" and index == BLOCKS - 1 else 1,
                experts=EXPERTS if scenario == "moe" else 0,
            )
            for index in range(BLOCKS)
        )
        self.head = nn.Linear(WIDTH, VOCAB)

    def forward(self, input_ids: torch.Tensor, route: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(input_ids)
        expert_of = input_ids % EXPERTS
        for index, block in enumerate(self.blocks):
            if self.scenario == "skip" and int(route[0]) == 1 and index in (2, 3):
                continue
            hidden = block(hidden, int(route[0]), expert_of)
        logits = self.head(hidden)
        return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), input_ids[:, 1:].reshape(-1))


def _batch(rank: int, step: int, scenario: str) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(100 * rank + step)
    ids = torch.randint(0, VOCAB, (2, 12), generator=generator)
    if scenario == "moe" and rank == 1:
        ids = ids - ids % EXPERTS + ids % 2  # token ids = 0 or 1 mod 4: experts 2 and 3 stay idle
    return ids, torch.tensor([rank % 2])


# ZeRO++ on 2 ranks of one node (LOCAL_WORLD_SIZE=2): int8 gradients reduce inside it; at stage 3,
# int8 forward gathers and the secondary partition too.
ZEROPP = {
    2: {"quantized_gradients": "int8", "quantization_block": 16},
    3: {
        "quantized_gradients": "int8",
        "quantized_weights": "int8",
        "hpz_partition_size": 2,
        "quantization_block": 16,
    },
}


def trace_case(scenario: str, zero: dict, muon: bool = False) -> list:
    """This rank's collectives over 3 steps of 2 micro-batches of `scenario` under `zero` (with
    `muon`, Muon for the blocks' weight matrices and AdamW for the rest)."""
    torch.manual_seed(0)
    model = DivergentNet(scenario)
    if muon:
        matrices = [p for n, p in model.named_parameters() if n.startswith("blocks.") and p.dim() == 2]
        rest = [p for n, p in model.named_parameters() if not (n.startswith("blocks.") and p.dim() == 2)]
        optimizer = [torch.optim.Muon(matrices, lr=1e-2), torch.optim.AdamW(rest, lr=1e-2)]
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    engine = hf_zero.initialize(model, optimizer, zero)
    trace = engine.trace_collectives()
    rank = dist.get_rank()
    for step in range(3):
        for micro in range(2):
            ids, route = _batch(rank, 2 * step + micro, scenario)
            engine.backward(engine(ids, route) / 2)
        engine.step()
    engine.close()
    return trace


CASES = (
    {
        f"{scenario}-stage{stage}-overlap{int(overlap)}{'' if prefetch is None else '-prefetch0'}": (
            scenario,
            {"stage": stage, "precision": "fp32", "overlap_comm": overlap}
            | ({} if prefetch is None else {"prefetch_bytes": prefetch}),
            False,
        )
        for scenario in ("last-branch", "moe", "skip")
        for stage in (2, 3)
        for overlap in (True, False)
        for prefetch in ((None, 0) if stage == 3 else (None,))
    }
    | {
        f"{scenario}-stage{stage}-muon": (scenario, {"stage": stage, "precision": "fp32"}, True)
        for scenario in ("last-branch", "moe")
        for stage in (2, 3)
    }
    | {
        f"{scenario}-stage{stage}-zeropp": (
            scenario,
            {"stage": stage, "precision": "fp32", **ZEROPP[stage]},
            False,
        )
        for scenario in ("last-branch", "moe", "skip")
        for stage in (2, 3)
    }
)


def main() -> None:
    out = sys.argv[1]
    dist.init_process_group("gloo")
    results = {}
    for name, (scenario, zero, muon) in CASES.items():
        traces: list = [None] * dist.get_world_size()
        dist.all_gather_object(traces, trace_case(scenario, zero, muon))
        results[name] = {"traces": traces, "difference": first_difference(traces)}
    if dist.get_rank() == 0:
        with open(out, "w") as file:
            json.dump(results, file)
    exit_cleanly()


if __name__ == "__main__":
    main()
