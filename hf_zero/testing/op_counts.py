"""Launched by tests/test_op_counts.py: what each training step issues, counted, for the tiny Llama
at 4 and 22 layers, trained with the Trainer's two param groups (decay / no decay) and clipping.

    torchrun --nproc_per_node 2 -m hf_zero.testing.op_counts OUT.json SWAP_DIR

Counts are per step, over 3 steps after one warm-up step: `collectives` from the engine's trace
(both communicators), `optimizer_calls` the fused optimizer kernel's calls (`adam_step`, one
launch each on a GPU), `stats_tensors` the tensors `grad_stats` reads (one launch each), and the
device layer's `host_syncs`, `event_waits`, `scratch_buffers` and `scratch_allocations`
(`ZeroEngine.device_counts`). Cases (`CASES`): the stages in fp32, and the host waits of bf16,
fp16, CPU offload (AdamW, and RMSprop on torch's own path), NVMe offload, and NVMe offload of the
parameters too (`uploads`: shards brought up from the file; `read_ahead`: those of them read ahead
of their gather), with prefetch budgets of one unit and of four layers. Rank 0 writes
`{"CASE-layersL": counts}`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

import hf_zero
from hf_zero.engine import fused_step
from hf_zero.engine import step as step_module

from .launch import exit_cleanly
from .tiny_models import llama_config, make_samples, slice_samples

STEPS = 3
LAYERS = (4, 22)
# name: (stage, precision, optimizer, extra ZeroConfig fields)
CASES = {
    "stage1": (1, "fp32", "adamw", {}),
    "stage2": (2, "fp32", "adamw", {}),
    "stage3": (3, "fp32", "adamw", {}),
    "stage3-no-prefetch": (3, "fp32", "adamw", {"prefetch_bytes": 0}),
    "stage2-bf16": (2, "bf16", "adamw", {}),
    "stage3-bf16": (3, "bf16", "adamw", {}),
    "stage2-fp16": (2, "fp16", "adamw", {}),
    "stage3-offload": (3, "bf16", "adamw", {"offload_optimizer": "cpu"}),
    "stage3-offload-rmsprop": (3, "bf16", "rmsprop", {"offload_optimizer": "cpu"}),
    "stage2-nvme": (2, "bf16", "adamw", {"offload_optimizer": "nvme"}),
    "stage3-nvme-params": (3, "bf16", "adamw", {"offload_optimizer": "nvme", "offload_params": "nvme"}),
    "stage3-nvme-params-one-ahead": (
        3,
        "bf16",
        "adamw",
        {"offload_optimizer": "nvme", "offload_params": "nvme", "prefetch_bytes": 1},
    ),
    # A budget of four layers' bf16 weights: the gatherer issues several units at a time.
    "stage3-nvme-params-four-ahead": (
        3,
        "bf16",
        "adamw",
        {"offload_optimizer": "nvme", "offload_params": "nvme", "prefetch_layers": 4},
    ),
}


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


def count(case: str, layers: int, swap: str) -> dict[str, float]:
    stage, precision, optimizer_name, extra = CASES[case]
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(llama_config(layers))
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer_class = torch.optim.AdamW if optimizer_name == "adamw" else torch.optim.RMSprop
    optimizer = optimizer_class(groups, lr=1e-3)
    config = {"stage": stage, "precision": precision, "gradient_clipping": 1.0, **extra}
    if "prefetch_layers" in config:  # a budget in layers: their 16-bit bytes
        layer_bytes = 2 * sum(p.numel() for p in model.model.layers[0].parameters())
        config["prefetch_bytes"] = config.pop("prefetch_layers") * layer_bytes
    if "nvme" in (config.get("offload_optimizer"), config.get("offload_params")):
        config["nvme_path"] = swap
    engine = hf_zero.initialize(model, optimizer, config)
    samples = make_samples("llama", 2 * world * (STEPS + 1))

    def step(index: int) -> None:
        batch = slice_samples(samples, (index * world + rank) * 2, 2)
        engine.backward(engine(**batch).loss)
        engine.step()
        engine.zero_grad()

    step(0)
    uploads = [0]
    for segment in engine.groups + engine.frozen:
        if segment.upload is not None:  # offload_params="nvme": count the shards brought up
            segment.upload = _counting(segment.upload, uploads)
    trace = engine.trace_collectives()
    device_before = engine.device_counts()
    read_ahead_before = engine.swapper.read_ahead_hits if engine.swapper is not None else 0
    optimizer_calls = _Counted(fused_step, "adam_step")
    stats = _Counted(step_module, "grad_stats", tensors_of=lambda grads: list(grads))
    try:
        for index in range(1, STEPS + 1):
            step(index)
    finally:
        optimizer_calls.restore()
        stats.restore()
    device_after = engine.device_counts()
    engine.close()
    return {
        "host_syncs": (device_after["host_syncs"] - device_before["host_syncs"]) / STEPS,
        "event_waits": (device_after["event_waits"] - device_before["event_waits"]) / STEPS,
        "scratch_buffers": (device_after["scratch_buffers"] - device_before["scratch_buffers"]) / STEPS,
        "scratch_allocations": (device_after["scratch_allocations"] - device_before["scratch_allocations"])
        / STEPS,
        "segments": len(engine.groups),
        "collectives": len(trace) / STEPS,
        "optimizer_calls": optimizer_calls.calls / STEPS,
        "stats_tensors": stats.tensors / STEPS,
        "parameter_tensors": len(decay) + len(no_decay),
        "uploads": uploads[0] / STEPS,
        "read_ahead": ((engine.swapper.read_ahead_hits if engine.swapper else 0) - read_ahead_before) / STEPS,
    }


def _counting(function, calls: list[int]):
    def counted():
        calls[0] += 1
        return function()

    return counted


def main() -> None:
    out, swap = Path(sys.argv[1]), sys.argv[2]
    dist.init_process_group("gloo")
    results = {f"{case}-layers{layers}": count(case, layers, swap) for case in CASES for layers in LAYERS}
    if dist.get_rank() == 0:
        out.write_text(json.dumps(results, indent=1))
    exit_cleanly()


if __name__ == "__main__":
    main()
