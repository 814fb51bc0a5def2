"""Launched by the fp16 and offload tests: train the tiny GPT-2 on several ranks, injecting overflows.

    torchrun --nproc_per_node W -m hf_zero.testing.step_checks JOBS.json OUT_DIR

Each job (a dict) builds a fresh model, optimizer and engine (`stage`, `precision` (default fp16),
`optimizer`, `clipping` and any extra ZeroConfig fields in `config`) and trains `steps` steps of
`accumulation` micro-batches of `micro_batch` (default 2) samples per rank; micro-batch `a` of
rank `r` takes block `a * world + r` of the step's global batch, which is how the unsharded
reference (`hf_zero.testing.unsharded`) splits them. One rank with `micro_batch` × W samples sees
the global batch of W ranks.

`overflow_at` maps a step to the rank that injects an overflow into that step: one element of
one gradient on that rank only becomes inf (the others stay finite; with the gradient sharded,
only the rank owning that element sees it). Around such steps every rank records whether its
masters, 16-bit shards and optimizer state came out bit-identical, the step count and the scale.
Each rank writes `OUT_DIR/JOB_NAME.rankR.pt`; rank 0 also the losses and the full weights.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import hf_zero

from .cases import build_optimizer
from .launch import exit_cleanly
from .tiny_models import build_model, make_samples, slice_samples

MICRO_BATCH = 2
INJECTED_PARAMETER = "transformer.h.0.mlp.c_fc.weight"


def _snapshot(engine) -> dict:
    """Everything a skipped step must leave alone, cloned."""
    state = {
        f"{index}.{key}": value.clone() if torch.is_tensor(value) else value
        for index, master in enumerate(g.master for g in engine.groups)
        for key, value in engine.optimizer.state.get(master, {}).items()
    }
    if engine.whole_step is not None:  # state kept whole at each parameter's owner
        for k, owned in engine.whole_step.states.items():
            state.update(
                {f"whole{k}.{key}": v.clone() if torch.is_tensor(v) else v for key, v in owned.items()}
            )
    return {
        "masters": [g.master.detach().clone() for g in engine.groups],
        # The 16-bit weights this rank keeps (at stage 3 only its shard; the rest is released).
        "flat": [(g.shard16 if g.sharded_params else g.flat).detach().clone() for g in engine.groups],
        "state": state,
    }


def _identical(before: dict, after: dict) -> bool:
    if before["state"].keys() != after["state"].keys():
        return False
    tensors = zip(before["masters"] + before["flat"], after["masters"] + after["flat"], strict=True)
    same_tensors = all(torch.equal(a, b) for a, b in tensors)
    return same_tensors and all(
        torch.equal(value, after["state"][key]) if torch.is_tensor(value) else value == after["state"][key]
        for key, value in before["state"].items()
    )


def run_job(job: dict) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    model = build_model("gpt2")
    optimizer = build_optimizer(job.get("optimizer", "adamw"), list(model.named_parameters()), model)
    config = {
        "stage": job["stage"],
        "precision": job.get("precision", "fp16"),
        "reduce_bucket_size": 4096,
        "gradient_clipping": job.get("clipping", 0.0),
        **job.get("config", {}),
    }
    engine = hf_zero.initialize(model, optimizer, config)
    injected = model.get_parameter(INJECTED_PARAMETER)
    overflow_at = {int(step): int(who) for step, who in job.get("overflow_at", {}).items()}
    inject = {"now": False}

    def poison(grad: torch.Tensor) -> torch.Tensor:
        if not inject["now"]:
            return grad
        grad = grad.clone()
        grad.view(-1)[-1] = float("inf")
        return grad

    injected.register_hook(poison)
    accumulation = job.get("accumulation", 1)
    micro_batch = job.get("micro_batch", MICRO_BATCH)
    batch = world * micro_batch * accumulation
    samples = make_samples("gpt2", job["steps"] * batch)
    losses, norms, steps_record = [], [], []
    for step in range(job["steps"]):
        inject["now"] = overflow_at.get(step) == rank
        loss = torch.zeros((), device=engine.device)
        for micro in range(accumulation):
            start = step * batch + (micro * world + rank) * micro_batch
            micro_loss = engine(**slice_samples(samples, start, micro_batch)).loss
            engine.backward(micro_loss / accumulation)
            loss = loss + micro_loss.detach().float() / accumulation
        before = _snapshot(engine) if step in overflow_at else None
        scale_before = engine.loss_scale
        engine.step()
        if engine.get_global_grad_norm() is not None:
            norms.append(engine.get_global_grad_norm().item())
        engine.zero_grad()
        inject["now"] = False
        record = {
            "step": step,
            "skipped": engine.last_step_skipped,
            "scale_before": scale_before,
            "scale_after": engine.loss_scale,
        }
        if before is not None:
            record["identical"] = _identical(before, _snapshot(engine))
        steps_record.append(record)
        total = loss.detach().float().clone()
        dist.all_reduce(total)
        losses.append(total.item() / world)
    weights = engine.full_state_dict(keep=rank == 0)
    adam_steps = [
        state["step"].item()
        for state in engine.optimizer.state.values()
        if torch.is_tensor(state.get("step"))
    ]
    return {
        "losses": losses,
        "norms": norms,
        "weights": weights,
        "steps": steps_record,
        "skipped_steps": engine.skipped_steps,
        "scaler": engine.loss_scaler.state_dict() if engine.loss_scaler is not None else None,
        "optimizer_steps": sorted(set(adam_steps)),
        "memory": engine.memory_breakdown(),
    }


def main() -> None:
    jobs, out = json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2])
    dist.init_process_group("gloo")
    for job in jobs:
        result = run_job(job)
        torch.save(result, out / f"{job['name']}.rank{dist.get_rank()}.pt")
    exit_cleanly()


if __name__ == "__main__":
    main()
