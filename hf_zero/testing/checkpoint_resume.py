"""Launched by the checkpoint tests: train the tiny GPT-2 through a list of jobs, saving and resuming.

    torchrun --nproc_per_node W -m hf_zero.testing.checkpoint_resume JOBS.json OUT_DIR

Each job (a dict) builds a fresh model and optimizer (two param groups, AdamW; `optimizer`: another
kind of `cases.build_optimizer`, such as Muon with SGD) and engine at its
`stage` (`precision`, and `bucket` size, so layouts differ even on the same world size), optionally loads the
checkpoint `resume` and continues from its step, trains up to `steps` steps on global batches of
`GLOBAL_BATCH` samples split evenly over the ranks, and saves a checkpoint into `save_dir` after
`save_at` steps. `dropout` switches dropout on (the resumed run must then continue each rank's
random stream exactly). Rank 0 writes `OUT_DIR/JOB_NAME.pt`: the global loss of every step run
and the full weights when saved and at the end.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import hf_zero

from .cases import build_optimizer
from .launch import exit_cleanly
from .tiny_models import build_model, make_samples, slice_samples

GLOBAL_BATCH = 4


def run_job(job: dict) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    model = build_model("gpt2")
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = job.get("dropout", 0.0)
    optimizer = build_optimizer(job.get("optimizer", "adamw"), list(model.named_parameters()), model)
    for group in optimizer.param_groups:
        if "betas" in group:
            # GPT-2's attention key bias gets a gradient of pure rounding noise (softmax ignores it),
            # which Adam with a tiny eps turns into full-size steps that differ between world sizes.
            group["eps"] = 1e-4
    config = {
        "stage": job["stage"],
        "reduce_bucket_size": job.get("bucket", 4096),
        "precision": job.get("precision", "fp32"),
    }
    engine = hf_zero.initialize(model, optimizer, config)
    torch.manual_seed(1000 + rank)  # each rank its own dropout stream
    start, loaded_bytes = 0, 0
    if job.get("resume"):
        manifest = engine.load_checkpoint(job["resume"])
        start, loaded_bytes = manifest["global_steps"], engine.loaded_bytes
        assert engine.global_steps == start
    samples = make_samples("gpt2", job["steps"] * GLOBAL_BATCH)
    per_rank = GLOBAL_BATCH // world
    losses, saved = [], None
    for step in range(start, job["steps"]):
        batch = slice_samples(samples, step * GLOBAL_BATCH + rank * per_rank, per_rank)
        loss = model(**batch).loss
        engine.backward(loss)
        engine.step()
        engine.zero_grad()
        total = loss.detach().clone()
        dist.all_reduce(total)
        losses.append(total.item() / world)
        if job.get("save_at") == step + 1:
            engine.save_checkpoint(job["save_dir"])
            saved = engine.full_state_dict(keep=rank == 0)
    weights = engine.full_state_dict(keep=rank == 0)
    return {
        "losses": losses,
        "start": start,
        "weights": weights,
        "saved_weights": saved,
        "loaded_bytes": loaded_bytes,  # rank 0's
    }


def main(argv: list[str]) -> None:
    jobs = json.loads(Path(argv[0]).read_text())
    out = Path(argv[1])
    dist.init_process_group("gloo")
    for job in jobs:
        result = run_job(job)
        if dist.get_rank() == 0:
            torch.save(result, out / f"{job['name']}.pt")
        dist.barrier()
    exit_cleanly()


if __name__ == "__main__":
    main(sys.argv[1:])
