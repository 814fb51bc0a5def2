"""Run training cases through the ZeRO engine on every rank; launch with torchrun.

    torchrun --standalone --nproc_per_node 2 -m hf_zero.testing.engine_matrix CASES_JSON OUT_DIR

Each rank writes `OUT_DIR/rank{r}.pt`: per case the global (rank-averaged) losses, gradient
norms, bytes sent per step, this rank's optimizer-state size, and (rank 0) the final weights.
A case with `integration="accelerate"` runs the same loop the way an Accelerate user writes it,
through `ZeroAccelerator`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

import hf_zero

from .cases import BUCKET_SIZE, Case, build_optimizer, cases_from_json
from .launch import exit_cleanly
from .tiny_models import build_model, make_samples, slice_samples


class _EngineLoop:
    """The plain-PyTorch loop: `engine.backward`, `engine.step`; clipping set in the config."""

    def __init__(self, model, optimizer, config: hf_zero.ZeroConfig, case: Case) -> None:
        self.engine = hf_zero.initialize(model, optimizer, config.replace(gradient_clipping=case.clipping))

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> None:
        self.engine.step()


class _AccelerateLoop:
    """The Accelerate loop: `prepare`, `accelerator.backward`, `clip_grad_norm_`, `optimizer.step`."""

    def __init__(self, model, optimizer, config: hf_zero.ZeroConfig, case: Case) -> None:
        from ..integrations.accelerator import ZeroAccelerator

        self.accelerator = ZeroAccelerator(zero_config=config, cpu=True)
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.engine = self.accelerator.zero_engine
        self.clipping = case.clipping

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    def step(self) -> None:
        if self.clipping > 0:
            self.accelerator.clip_grad_norm_(self.model.parameters(), self.clipping)
        self.optimizer.step()
        self.optimizer.zero_grad()


LOOPS = {"engine": _EngineLoop, "accelerate": _AccelerateLoop}


def run_sharded(case: Case) -> dict:
    """Train `case` with hf_zero on this rank; every rank of the group must call it."""
    rank, world = dist.get_rank(), dist.get_world_size()
    model = build_model(case.model)
    optimizer = build_optimizer(case.optimizer, list(model.named_parameters()))
    config = hf_zero.ZeroConfig(stage=case.stage, precision=case.precision, reduce_bucket_size=BUCKET_SIZE)
    loop = LOOPS[case.integration](model, optimizer, config, case)
    engine = loop.engine
    batch = case.global_batch(world)
    samples = make_samples(case.model, case.steps * batch)
    losses, norms, comm_bytes = [], [], []
    for step in range(case.steps):
        step_loss = torch.zeros(())
        for micro in range(case.accumulation):
            start = step * batch + (micro * world + rank) * case.micro_batch
            loss = engine(**slice_samples(samples, start, case.micro_batch)).loss / case.accumulation
            loop.backward(loss)
            step_loss += loss.detach().float()
        loop.step()
        dist.all_reduce(step_loss)
        losses.append(step_loss.item() / world)
        comm_bytes.append(engine.last_step_comm_bytes)
        if case.clipping > 0:
            norms.append(engine.last_grad_norm.item())
    full = engine.full_state_dict()
    state_numel = sum(
        value.numel()
        for state in engine.optimizer.state_dict()["state"].values()
        for value in state.values()
        if torch.is_tensor(value) and value.dim() > 0
    )
    # The model must compute with exactly the master weights rounded to the compute dtype.
    live = model.state_dict()
    model_matches_master = all(
        torch.equal(live[key], value.to(live[key].dtype))
        for key, value in full.items()
        if value.is_floating_point()
    )
    result = {
        "losses": losses,
        "norms": norms,
        "comm_bytes": comm_bytes,
        "state_numel": state_numel,
        "flat_numel": sum(group.layout.numel for group in engine.groups),
        "param_count": sum(p.numel() for p in model.parameters()),
        "element_size": engine.compute_dtype.itemsize,
        "model_matches_master": model_matches_master,
        "weights_checksum": sum(v.double().sum().item() for v in full.values() if v.is_floating_point()),
        "peak_staged_elements": getattr(engine.grad_sync, "peak_staged_elements", None),
    }
    if rank == 0:
        result["weights"] = {k: v.float() for k, v in full.items() if v.is_floating_point()}
    return result


def main(argv: list[str]) -> None:
    cases_json, out_dir = argv
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    results = {case.name: run_sharded(case) for case in cases_from_json(Path(cases_json).read_text())}
    torch.save(results, Path(out_dir) / f"rank{dist.get_rank()}.pt")
    exit_cleanly()


if __name__ == "__main__":
    main(sys.argv[1:])
