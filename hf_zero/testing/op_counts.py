"""Launched by tests/test_op_counts.py: how many collectives, optimizer-kernel calls and gradient
tensors read for statistics each training step issues, for the tiny Llama at 4 and 22 layers,
trained with the Trainer's two param groups (decay / no decay) and clipping.

    torchrun --nproc_per_node 2 -m hf_zero.testing.op_counts OUT.json

Counts are per step, over 3 steps after one warm-up step: `collectives` from the engine's trace
(both communicators), `optimizer_calls` the fused optimizer kernel's calls (`adam_step`, one
launch each on a GPU), `stats_tensors` the tensors `grad_stats` reads (one launch each). Rank 0
writes `{"stage{S}-layers{L}": counts}`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

import hf_zero
from hf_zero import engine as engine_module
from hf_zero import fused_step

from .launch import exit_cleanly
from .tiny_models import llama_config, make_samples, slice_samples

STEPS = 3
LAYERS = (4, 22)
STAGES = (1, 2, 3)


class _Counted:
    """Wraps a function in a module's namespace and counts its calls (and tensors handed to it)."""

    def __init__(self, module, name: str, tensors_of=None) -> None:
        self.module, self.name, self.original = module, name, getattr(module, name)
        self.calls = self.tensors = 0
        self.tensors_of = tensors_of
        setattr(module, name, self)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.tensors_of is not None:
            self.tensors += len(self.tensors_of(*args))
        return self.original(*args, **kwargs)

    def restore(self) -> None:
        setattr(self.module, self.name, self.original)


def count(stage: int, layers: int) -> dict[str, float]:
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(llama_config(layers))
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}], lr=1e-3
    )
    engine = hf_zero.initialize(model, optimizer, {"stage": stage, "gradient_clipping": 1.0})
    samples = make_samples("llama", 2 * world * (STEPS + 1))

    def step(index: int) -> None:
        batch = slice_samples(samples, (index * world + rank) * 2, 2)
        engine.backward(engine(**batch).loss)
        engine.step()
        engine.zero_grad()

    step(0)
    trace = engine.trace_collectives()
    optimizer_calls = _Counted(fused_step, "adam_step")
    stats = _Counted(engine_module, "grad_stats", tensors_of=lambda grads: list(grads))
    try:
        for index in range(1, STEPS + 1):
            step(index)
    finally:
        optimizer_calls.restore()
        stats.restore()
    engine.close()
    return {
        "collectives": len(trace) / STEPS,
        "optimizer_calls": optimizer_calls.calls / STEPS,
        "stats_tensors": stats.tensors / STEPS,
        "parameter_tensors": len(decay) + len(no_decay),
    }


def main() -> None:
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    results = {f"stage{stage}-layers{layers}": count(stage, layers) for stage in STAGES for layers in LAYERS}
    if dist.get_rank() == 0:
        out.write_text(json.dumps(results, indent=1))
    exit_cleanly()


if __name__ == "__main__":
    main()
