"""Training cases that the sharded engine and the unsharded reference both run.

A case fixes the model, the ZeRO stage, precision, optimizer, accumulation and clipping. Step
`s` consumes the global batch of `world * accumulation * micro_batch` samples starting at
`s * global_batch`; in the sharded run, micro-batch `a` of rank `r` takes block `a * world + r`
of it, so both runs see exactly the same samples per step.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

BUCKET_SIZE = 6000  # small, so the tiny models span many buckets and chunk boundaries cut parameters


@dataclass(frozen=True)
class Case:
    """One training configuration to compare."""

    model: str
    stage: int
    precision: str = "fp32"
    optimizer: str = "adamw"
    accumulation: int = 1
    clipping: float = 0.0
    steps: int = 3
    micro_batch: int = 2
    integration: str = "engine"  # or "accelerate": the same loop through ZeroAccelerator

    @property
    def name(self) -> str:
        name = (
            f"{self.model}-stage{self.stage}-{self.precision}-{self.optimizer}"
            f"-acc{self.accumulation}-clip{self.clipping:g}"
        )
        return name if self.integration == "engine" else name + "-" + self.integration

    def global_batch(self, world_size: int) -> int:
        return world_size * self.accumulation * self.micro_batch


def cases_to_json(cases: Sequence[Case]) -> str:
    return json.dumps([asdict(case) for case in cases])


def cases_from_json(text: str) -> list[Case]:
    return [Case(**fields) for fields in json.loads(text)]


def build_optimizer(kind: str, named: Sequence[tuple[str, torch.Tensor]]) -> torch.optim.Optimizer:
    """The optimizer of a case over (name, tensor) pairs.

    "adamw" uses two param groups (decay for matrices, none for vectors) with different learning
    rates, like the Trainer's grouping, so per-group hyper-parameters are exercised.
    """
    params = [tensor for _, tensor in named]
    if kind == "adamw":
        matrices = [t for t in params if t.dim() >= 2]
        vectors = [t for t in params if t.dim() < 2]
        return torch.optim.AdamW(
            [{"params": matrices, "weight_decay": 0.1}, {"params": vectors, "weight_decay": 0.0, "lr": 2e-3}],
            lr=1e-3,
        )
    if kind == "adam":
        return torch.optim.Adam(params, lr=1e-3)
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.05, momentum=0.9)
    if kind == "rmsprop":
        return torch.optim.RMSprop(params, lr=1e-3)
    if kind == "adagrad":
        # A non-zero initial accumulator gives Adagrad state before the first step (which the
        # engine must re-lay onto shards) and keeps its first update from being sign(grad).
        return torch.optim.Adagrad(params, lr=1e-2, initial_accumulator_value=0.1)
    raise ValueError(f"unknown optimizer kind {kind!r}")
