"""Run training cases through the ZeRO engine on every rank; launch with torchrun.

    torchrun --standalone --nproc_per_node 2 -m hf_zero.testing.engine_matrix CASES_JSON OUT_DIR

Each rank writes `OUT_DIR/rank{r}.pt`: per case the global (rank-averaged) losses, gradient
norms, the bytes the collectives were called with per step (measured at `torch.distributed`), the
engine's own memory breakdown and optimizer-state size, and (first rank of each group) the final
weights. A case with `loop="accelerate"` runs the loop the way an Accelerate user writes it,
through `ZeroAccelerator`; `loop="plain"` the way a plain PyTorch user does (`loss.backward()`,
`torch.nn.utils.clip_grad_norm_`, `optimizer.step()`, `optimizer.zero_grad()`). A case with
`subgroups=k` splits the world into k process groups that each train the case on their own.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

import hf_zero
import hf_zero.core.distributed as hf_dist

from .cases import Case, build_optimizer, cases_from_json, values_to_load
from .launch import exit_cleanly
from .tiny_models import build_model, make_samples, slice_samples

FULL_GRAD_PARAMS = 2  # the plain loop records hf_zero.full_grad of this many parameters per step


class CollectiveSpy:
    """Counts the bytes of every collective call that reaches `torch.distributed`, with the ring
    model (a reduce-scatter or all-gather of n elements sends (W-1)/W of them, an all-reduce twice
    that, a broadcast all of them; an all-to-all what leaves the rank), from the tensors actually
    passed."""

    def __init__(self) -> None:
        self.bytes = 0
        self.paused = False
        self.world = 1

    def install(self) -> None:
        """Count from now on. The checks that count compare with the ring model of NCCL's
        collectives, which gloo's own follow: gloo's rerouted large ones (an all-reduce for a
        reduce-scatter, `core/distributed.py`) carry other bytes, so they are turned off here."""
        hf_dist.GLOO_REROUTE_BYTES = sys.maxsize

        def counting(function, factor, pick):
            def wrapped(*args, **kwargs):
                if not self.paused:
                    tensor = pick(args, kwargs)
                    group = kwargs.get("group")
                    world = dist.get_world_size(group)
                    share = 1.0 if factor == "all" else factor * (world - 1) / world
                    self.bytes += round(tensor.numel() * tensor.element_size() * share)
                return function(*args, **kwargs)

            return wrapped

        hf_dist._reduce_scatter_single = counting(hf_dist._reduce_scatter_single, 1.0, lambda a, k: a[1])
        hf_dist._all_gather_single = counting(hf_dist._all_gather_single, 1.0, lambda a, k: a[0])
        dist.all_reduce = counting(dist.all_reduce, 2.0, lambda a, k: a[0])
        dist.broadcast = counting(dist.broadcast, "all", lambda a, k: a[0])
        exchange = dist.all_to_all_single

        def all_to_all_single(output, input, output_split_sizes, input_split_sizes, group=None, **kwargs):
            if not self.paused:  # every element but those a rank keeps for itself leaves it
                own = input_split_sizes[dist.get_rank(group)]
                self.bytes += (input.numel() - own) * input.element_size()
            return exchange(output, input, output_split_sizes, input_split_sizes, group=group, **kwargs)

        dist.all_to_all_single = all_to_all_single

    def take(self) -> int:
        taken, self.bytes = self.bytes, 0
        return taken

    @contextlib.contextmanager
    def pause(self):
        self.paused = True
        try:
            yield
        finally:
            self.paused = False


SPY = CollectiveSpy()


class _EngineLoop:
    """The plain-PyTorch loop with the engine's API: `engine.backward`, `engine.step`; clipping set
    in the config."""

    def __init__(self, model, optimizer, case: Case, group) -> None:
        config = hf_zero.ZeroConfig(**case.zero_config(), gradient_clipping=case.clipping)
        self.engine = hf_zero.initialize(model, optimizer, config, process_group=group)
        self.model, self.optimizer = model, optimizer

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> float | None:
        self.engine.step()
        return None


class _PlainLoop(_EngineLoop):
    """A plain PyTorch loop that does not know about the engine beyond `initialize`."""

    def __init__(self, model, optimizer, case: Case, group) -> None:
        self.engine = hf_zero.initialize(model, optimizer, case.zero_config(), process_group=group)
        self.model, self.optimizer, self.clipping = model, optimizer, case.clipping

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> float | None:
        norm = None
        if self.clipping > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clipping).item()
        self.optimizer.step()
        self.optimizer.zero_grad()
        return norm


class _AccelerateLoop:
    """The Accelerate loop: `prepare`, `accelerator.backward`, `clip_grad_norm_`, `optimizer.step`."""

    def __init__(self, model, optimizer, case: Case, group) -> None:
        from ..integrations.accelerator import ZeroAccelerator

        self.accelerator = ZeroAccelerator(zero_config=case.zero_config(), cpu=True)
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.engine = self.accelerator.zero_engine
        self.clipping = case.clipping

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    def step(self) -> float | None:
        norm = None
        if self.clipping > 0:
            norm = self.accelerator.clip_grad_norm_(self.model.parameters(), self.clipping).item()
        self.optimizer.step()
        self.optimizer.zero_grad()
        return norm


LOOPS = {"engine": _EngineLoop, "accelerate": _AccelerateLoop, "plain": _PlainLoop}


def _build(case: Case, group):
    model = build_model(case.model)
    named = [(n, p) for n, p in model.named_parameters()]
    optimizer = build_optimizer(case.optimizer, named, model)
    return LOOPS[case.loop](model, optimizer, case, group)


def _resumed(case: Case, loop, group):
    """Save a checkpoint, build everything afresh and load it, as a restarted job would."""
    holder = [tempfile.mkdtemp(prefix="hf_zero_resume_") if dist.get_rank(group) == 0 else None]
    dist.broadcast_object_list(holder, src=dist.get_global_rank(group, 0) if group else 0, group=group)
    folder = Path(holder[0]) / "checkpoint"
    loop.engine.save_checkpoint(folder)
    fresh = _build(case, group)
    fresh.engine.load_checkpoint(folder)
    dist.barrier(group=group)
    if dist.get_rank(group) == 0:
        shutil.rmtree(holder[0])
    return fresh


def run_sharded(case: Case, group=None) -> dict:
    """Train `case` with hf_zero on this rank; every rank of `group` must call it."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    loop = _build(case, group)
    batch = case.global_batch(world)
    samples = make_samples(case.model, case.steps * batch)
    bad_samples = make_samples(case.model, case.steps * world * case.micro_batch, seed=99)
    eval_batch = make_samples(case.model, case.micro_batch, seed=7)
    losses, norms, comm_bytes, full_grads = [], [], [], []
    SPY.take()
    for step in range(case.steps):
        if case.scenario == "resume" and step == case.steps // 2:
            with SPY.pause():
                loop = _resumed(case, loop, group)
        if case.scenario == "load_state_dict" and step == 1:
            loop.model.load_state_dict(values_to_load(case), strict=False)
        if case.scenario == "discard":
            start = (step * world + rank) * case.micro_batch
            loop.backward(loop.model(**slice_samples(bad_samples, start, case.micro_batch)).loss * 10)
            loop.optimizer.zero_grad()
        step_loss = torch.zeros(())
        for micro in range(case.accumulation):
            start = step * batch + (micro * world + rank) * case.micro_batch
            loss = loop.model(**slice_samples(samples, start, case.micro_batch)).loss / case.accumulation
            loop.backward(loss)
            step_loss += loss.detach().float()
            if case.scenario == "eval_between" and micro == 0:
                loop.model.eval()
                with torch.no_grad():
                    loop.model(**eval_batch)
                loop.model.train()
        if case.loop == "plain":
            trainable = [(n, p) for n, p in loop.model.named_parameters() if p.requires_grad]
            full_grads.append({n: hf_zero.full_grad(p).cpu() for n, p in trainable[:FULL_GRAD_PARAMS]})
        norm = loop.step()
        with SPY.pause():
            dist.all_reduce(step_loss, group=group)
        comm_bytes.append(SPY.take())
        losses.append(step_loss.item() / world)
        if case.clipping > 0:
            norms.append(norm if norm is not None else loop.engine.last_grad_norm.item())
    engine = loop.engine
    memory = engine.memory_breakdown()  # before the checks below gather anything
    with SPY.pause():
        full = engine.full_state_dict()
    state_numel = sum(
        value.numel()
        for state in engine.optimizer.state_dict()["state"].values()
        for value in state.values()
        if torch.is_tensor(value) and value.dim() > 0
    )
    # The model must compute with exactly the master weights rounded to its compute dtype (at
    # stage 3, once gathered).
    with SPY.pause(), hf_zero.gathered_parameters(loop.model.parameters()):
        live = {k: v.clone() for k, v in loop.model.state_dict().items()}
    model_matches_master = all(
        torch.equal(live[key], value.to(live[key].dtype))
        for key, value in full.items()
        if value.is_floating_point()
    )
    result = {
        "losses": losses,
        "norms": norms,
        "comm_bytes": comm_bytes,
        "full_grads": full_grads,
        "state_numel": state_numel,
        "segments": [
            (
                g.layout.numel,
                g.layout.shard_numel,
                g.compute_dtype.itemsize,
                len(g.layout.slots),
                len(g.layout.buckets),
            )
            for g in engine.groups
        ],
        "segment_units": [g.unit for g in engine.groups],
        # Muon and whole-parameter optimizers: the bytes of this rank's all-to-alls per step.
        "matrix_exchange_bytes": _matrix_exchange_bytes(engine),
        "muon_segments": sorted(engine.matrix_step.segments) if engine.matrix_step else [],
        "muon_numel": engine.matrix_step.total_elements if engine.matrix_step else 0,
        "whole_segments": sorted(engine.whole_step.segments) if engine.whole_step else [],
        "whole_numel": engine.whole_step.total_elements if engine.whole_step else 0,
        "whole_state_bytes": engine.whole_step.state_bytes() if engine.whole_step else 0,
        # Units gathered again in backward (an input embedding's backward needs no weights).
        "backward_units": engine.gatherer.backward_walk.order if engine.gatherer else [],
        "unit_names": [unit.name for unit in engine.units],
        "frozen_segments": [
            (g.layout.numel, g.layout.shard_numel, g.compute_dtype.itemsize, g.unit) for g in engine.frozen
        ],
        "frozen_names": [slot.name for g in engine.frozen for slot in g.layout.slots],
        "prefetch_bytes": engine.gatherer.prefetch_bytes if engine.gatherer else 0,
        "prefetched_units": engine.gatherer.prefetched_units if engine.gatherer else 0,
        "buckets": [
            [(b.size, [g.layout.slots[i].name for i in b.slots]) for b in g.layout.buckets]
            for g in engine.groups
        ],
        "param_count": sum(p.numel() for p in loop.model.parameters()),
        "memory": memory,
        "model_matches_master": model_matches_master,
        "weights_checksum": sum(v.double().sum().item() for v in full.values() if v.is_floating_point()),
        "peak_staged_elements": getattr(engine.grad_sync, "peak_staged_elements", 0),
    }
    if rank == 0:
        result["weights"] = {k: v.float() for k, v in full.items() if v.is_floating_point()}
    return result


def _matrix_exchange_bytes(engine) -> int:
    total = 0
    for plan, out, back in ((engine.matrix_step, 2, 2), (engine.whole_step, 8, 4)):
        if plan is None or plan.num_shards == 1:
            continue
        # Out: this rank's pieces of parameters others own (Muon: the bf16 update; whole parameters:
        # the fp32 gradient and master); back: others' pieces of its own (bf16, or the fp32 master).
        total += out * (sum(plan.send_counts) - plan.send_counts[plan.rank])
        total += back * (sum(plan.receive_counts) - plan.receive_counts[plan.rank])
    return total


def main(argv: list[str]) -> None:
    cases_json, out_dir = argv
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    SPY.install()
    results = {}
    for case in cases_from_json(Path(cases_json).read_text()):
        group, index = None, 0
        if case.subgroups:
            size = dist.get_world_size() // case.subgroups
            groups = [dist.new_group(list(range(k * size, (k + 1) * size))) for k in range(case.subgroups)]
            index = dist.get_rank() // size
            group = groups[index]
        results[case.name] = {**run_sharded(case, group), "subgroup": index}
    torch.save(results, Path(out_dir) / f"rank{dist.get_rank()}.pt")
    exit_cleanly()


if __name__ == "__main__":
    main(sys.argv[1:])
