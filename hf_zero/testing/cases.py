"""Training cases that the sharded engine and the unsharded reference both run.

A case fixes the model, the ZeRO stage, precision, optimizer, accumulation, clipping, bucket
size, the loop style and an optional scenario. Step `s` consumes the global batch of
`world * accumulation * micro_batch` samples starting at `s * global_batch`; in the sharded run,
micro-batch `a` of rank `r` takes block `a * world + r` of it, and the reference runs the same
blocks one by one, so both runs see exactly the same samples per step.

Scenarios (what a user does besides plain training):
- "eval_between": an evaluation forward under `no_grad` between two micro-batches;
- "discard": before each step, a bad micro-batch is backpropagated and thrown away with
  `optimizer.zero_grad()`;
- "load_state_dict": before step 1, `model.load_state_dict` loads other values into half the
  parameters;
- "resume": halfway, the state is saved, a fresh model and engine are built and the state loaded.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .tiny_models import build_model

BUCKET_SIZE = 6000  # small, so the tiny models span many buckets and chunk boundaries cut parameters
SCENARIOS = ("", "eval_between", "discard", "load_state_dict", "resume")
LOOPS = ("engine", "accelerate", "plain")


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
    loop: str = "engine"  # "accelerate": through ZeroAccelerator; "plain": loss.backward(), torch clipping
    bucket_size: int = BUCKET_SIZE  # 0: ZeroConfig's default (one big bucket for these models)
    overlap: bool = True
    scenario: str = ""
    subgroups: int = 0  # > 0: the world is split into this many process groups, each training alone
    units: str = ""  # comma-separated layer classes for ZeroConfig.unit_classes ("": the model's own)
    prefetch_bytes: int = -1  # stage 3: ZeroConfig.prefetch_bytes (-1: its default)

    def __post_init__(self) -> None:
        if self.scenario not in SCENARIOS or self.loop not in LOOPS:
            raise ValueError(f"unknown scenario {self.scenario!r} or loop {self.loop!r}")

    @property
    def name(self) -> str:
        parts = [
            f"{self.model}-stage{self.stage}-{self.precision}-{self.optimizer}"
            f"-acc{self.accumulation}-clip{self.clipping:g}"
        ]
        if (self.steps, self.micro_batch) != (3, 2):
            parts.append(f"{self.steps}steps-mb{self.micro_batch}")
        if self.bucket_size != BUCKET_SIZE:
            parts.append(f"bucket{self.bucket_size}")
        if not self.overlap:
            parts.append("nooverlap")
        if self.loop != "engine":
            parts.append(self.loop)
        if self.scenario:
            parts.append(self.scenario)
        if self.subgroups:
            parts.append(f"in{self.subgroups}groups")
        if self.units:
            parts.append(f"units-{self.units.replace(',', '+')}")
        if self.prefetch_bytes >= 0:
            parts.append(f"prefetch{self.prefetch_bytes}")
        return "-".join(parts)

    def global_batch(self, world_size: int) -> int:
        return world_size * self.accumulation * self.micro_batch

    def zero_config(self) -> dict:
        # Every case also checks that all ranks issued the same collectives, step by step.
        config = {
            "stage": self.stage,
            "precision": self.precision,
            "overlap_comm": self.overlap,
            "debug_collectives": True,
        }
        if self.bucket_size:
            config["reduce_bucket_size"] = self.bucket_size
        if self.units:
            config["unit_classes"] = self.units.split(",")
        if self.prefetch_bytes >= 0:
            config["prefetch_bytes"] = self.prefetch_bytes
        return config


def cases_to_json(cases: Sequence[Case]) -> str:
    return json.dumps([asdict(case) for case in cases])


def cases_from_json(text: str) -> list[Case]:
    return [Case(**fields) for fields in json.loads(text)]


def build_optimizer(
    kind: str, named: Sequence[tuple[str, torch.Tensor]], model: nn.Module
) -> torch.optim.Optimizer:
    """The optimizer of a case over (name, tensor) pairs of `model`.

    "adamw" uses two param groups (decay for matrices, none for vectors) with different learning
    rates; "adamw_trainer" the Trainer's own split (`get_decay_parameter_names`) plus an empty third
    group; "adamw_fused" torch's fused AdamW in one group.
    """
    params = [tensor for _, tensor in named]
    if kind == "adamw":
        matrices = [t for t in params if t.dim() >= 2]
        vectors = [t for t in params if t.dim() < 2]
        return torch.optim.AdamW(
            [{"params": matrices, "weight_decay": 0.1}, {"params": vectors, "weight_decay": 0.0, "lr": 5e-3}],
            lr=3e-3,
        )
    if kind == "adamw_trainer":
        from transformers import Trainer

        decay = set(Trainer.get_decay_parameter_names(None, model))
        return torch.optim.AdamW(
            [
                {"params": [t for n, t in named if n in decay], "weight_decay": 0.1},
                {"params": [t for n, t in named if n not in decay], "weight_decay": 0.0},
                {"params": [], "weight_decay": 0.0},
            ],
            lr=3e-3,
        )
    if kind in ("muon", "muon_sgd"):
        # Muon for the hidden matrices, AdamW (or SGD, linear) for the rest, chained into one.
        from ..core.chained_optimizer import ChainedOptimizer
        from ..integrations.muon import hidden_matrix_names

        hidden = set(hidden_matrix_names(model))
        rest = [t for n, t in named if n not in hidden]
        optimizers = [torch.optim.Muon([t for n, t in named if n in hidden], lr=0.02, weight_decay=0.1)]
        if rest and kind == "muon":  # (a LoRA reference trains adapters only, all of them Muon's)
            optimizers.append(torch.optim.AdamW(rest, lr=3e-3, weight_decay=0.0))
        elif rest:
            optimizers.append(torch.optim.SGD(rest, lr=0.05, momentum=0.9))
        return ChainedOptimizer(optimizers)
    if kind == "adafactor":  # factored second moments: each parameter stepped whole at its owner
        return torch.optim.Adafactor(params, lr=1e-2)
    if kind == "adamw_fused":
        return torch.optim.AdamW(params, lr=3e-3, weight_decay=0.05, fused=True)
    if kind == "adam":
        return torch.optim.Adam(params, lr=3e-3)
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.05, momentum=0.9)
    if kind == "rmsprop":
        return torch.optim.RMSprop(params, lr=1e-3)
    if kind == "adagrad":
        # A non-zero initial accumulator gives Adagrad state before the first step (which the
        # engine must re-lay onto shards) and keeps its first update from being sign(grad).
        return torch.optim.Adagrad(params, lr=1e-2, initial_accumulator_value=0.1)
    raise ValueError(f"unknown optimizer kind {kind!r}")


def values_to_load(case: Case) -> dict[str, torch.Tensor]:
    """What the "load_state_dict" scenario loads: another initialisation's values for every
    second trainable parameter (fp32, so the masters must take them exactly)."""
    other = build_model(case.model, seed=5)
    names = [name for name, param in other.named_parameters() if param.requires_grad]
    return {name: other.get_parameter(name).detach().float() for name in names[::2]}
