"""Launched by the Liger tests: train the tiny Llama sharded, with and without Liger-Kernel.

    torchrun --nproc_per_node W -m hf_zero.testing.liger_checks JOBS.json OUT_DIR

Each job (a dict) builds the tiny Llama, patches it with Liger the way `Trainer(use_liger_kernel=
True)` does (`transformers.integrations.liger.apply_liger_kernel`, with the job's `liger` kernel
config; no `liger` key: unpatched), shards it at `stage` and `precision` and trains `steps` steps
of AdamW; rank `r` takes micro-batch `r` of each global batch. Rank 0 writes
`OUT_DIR/JOB_NAME.pt`: the global losses, the full weights at the end, and whether the training
forward returned logits (Liger's fused linear cross-entropy computes the loss chunk by chunk and
returns none).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import hf_zero

from .launch import exit_cleanly
from .tiny_models import build_model, make_samples, slice_samples

MICRO_BATCH = 2


def run_job(job: dict) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    model = build_model("llama")
    if "liger" in job:
        from transformers.integrations.liger import apply_liger_kernel

        apply_liger_kernel(model, job["liger"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    engine = hf_zero.initialize(
        model, optimizer, {"stage": job["stage"], "precision": job.get("precision", "fp32")}
    )
    batch = world * MICRO_BATCH
    samples = make_samples("llama", job["steps"] * batch)
    losses, logits_returned = [], []
    for step in range(job["steps"]):
        output = engine(**slice_samples(samples, step * batch + rank * MICRO_BATCH, MICRO_BATCH))
        logits_returned.append(output.logits is not None)
        engine.backward(output.loss)
        engine.step()
        engine.zero_grad()
        total = output.loss.detach().float().clone()
        dist.all_reduce(total)
        losses.append(total.item() / world)
    weights = engine.full_state_dict(keep=rank == 0)
    return {"losses": losses, "weights": weights, "logits_returned": logits_returned}


def main() -> None:
    jobs, out = json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2])
    dist.init_process_group("gloo")
    for job in jobs:
        result = run_job(job)
        if dist.get_rank() == 0:
            torch.save(result, out / f"{job['name']}.pt")
    exit_cleanly()


if __name__ == "__main__":
    main()
