"""Launched by `tests/test_collectives.py`: gloo's rerouted reduce-scatter and all-gather
(`core/distributed.py`, `GLOO_REROUTE_BYTES`) give what gloo's own collectives give, on each
route: a message per tensor and rank (point-to-point reduce-scatter, broadcast all-gather), and a
batch whole (all-reduce reduce-scatter).

    torchrun --nproc_per_node 3 -m hf_zero.testing.collective_checks OUT.json

1. The collectives alone, on every rank and on a sub-group of ranks {0, 2} (whose broadcasts must
   name global ranks): batches of separate tensors and of adjacent views of one buffer (stage 1's
   buckets), in place and not, fp32, bf16 and int8 (ZeRO++'s gathers). The values are small
   integers, so every order of summation gives the same bits: each route is compared with a
   reference built from every rank's inputs, exactly.
2. The engine at stages 1, 2 and 3: the same training on each route and on gloo's own, the
   weights the same up to the order of summation.

Rank 0 writes a JSON object: check name -> list of failures (empty when it held).
"""

from __future__ import annotations

import json
import sys
import weakref

import torch
import torch.distributed as dist

import hf_zero
import hf_zero.core.distributed as hf_dist

from .launch import exit_cleanly
from .tiny_models import build_model, make_samples, slice_samples

# (GLOO_REROUTE_BYTES, GLOO_MESSAGE_BYTES) for each route.
ROUTES = {"per tensor": (0, 0), "whole batch": (0, 2**62), "gloo's own": (2**62, 2**20)}


def _route(name: str) -> None:
    hf_dist.GLOO_REROUTE_BYTES, hf_dist.GLOO_MESSAGE_BYTES = ROUTES[name]


def _values(seed: int, numel: int, dtype: torch.dtype) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(-8, 9, (numel,), generator=generator).to(dtype)


def _check_collectives(group, ranks: list[int], failures: list[str]) -> None:
    """Reduce-scatter and all-gather batches through `Collectives` on `group` (global `ranks`)."""
    me, world = ranks.index(dist.get_rank()), len(ranks)
    comm = hf_dist.Collectives(hf_dist.DistContext(me, world, me, torch.device("cpu"), weakref.ref(group)))
    sizes = [5, 12, 1]  # chunk elements per pair
    for dtype in (torch.float32, torch.bfloat16):
        inputs = {r: [_values(100 * r + k, n * world, dtype) for k, n in enumerate(sizes)] for r in ranks}
        total = [sum(inputs[r][k] for r in ranks) for k in range(len(sizes))]
        want = [t[me * n : (me + 1) * n] for t, n in zip(total, sizes, strict=True)]
        for route in ROUTES:
            _route(route)
            # Separate tensors, out of place.
            mine = [t.clone() for t in inputs[dist.get_rank()]]
            outs = [torch.empty(n, dtype=dtype) for n in sizes]
            for work in comm.reduce_scatter_many(list(zip(outs, mine, strict=True))):
                work.wait()
            if any(not torch.equal(o, w) for o, w in zip(outs, want, strict=True)):
                failures.append(f"{ranks} {dtype} {route}: reduce-scatter of separate tensors")
            # Adjacent bucket views of one buffer, each reduced into its own chunk in place.
            buffer = torch.cat(inputs[dist.get_rank()])
            views, start = [], 0
            for n in sizes:
                view = buffer[start : start + n * world]
                views.append((view[me * n : (me + 1) * n], view))
                start += n * world
            for work in comm.reduce_scatter_many(views):
                work.wait()
            if any(not torch.equal(out, w) for (out, _), w in zip(views, want, strict=True)):
                failures.append(f"{ranks} {dtype} {route}: reduce-scatter of adjacent views in place")
    for dtype in (torch.float32, torch.bfloat16, torch.int8):
        chunks = {r: [_values(7 * r + k, n, dtype) for k, n in enumerate(sizes)] for r in ranks}
        want = [torch.cat([chunks[r][k] for r in ranks]) for k in range(len(sizes))]
        for route in ROUTES:
            _route(route)
            # Out of place: the input is a tensor of its own.
            outs = [torch.full((n * world,), 99, dtype=dtype) for n in sizes]
            for work in comm.all_gather_many(list(zip(outs, chunks[dist.get_rank()], strict=True))):
                work.wait()
            if any(not torch.equal(o, w) for o, w in zip(outs, want, strict=True)):
                failures.append(f"{ranks} {dtype} {route}: all-gather out of place")
            # In place: the input is this rank's chunk of the output (stage 3's flat buffers).
            outs = [torch.full((n * world,), 99, dtype=dtype) for n in sizes]
            pairs = []
            for out, chunk in zip(outs, chunks[dist.get_rank()], strict=True):
                own = out[me * chunk.numel() : (me + 1) * chunk.numel()]
                own.copy_(chunk)
                pairs.append((out, own))
            for work in comm.all_gather_many(pairs):
                work.wait()
            if any(not torch.equal(o, w) for o, w in zip(outs, want, strict=True)):
                failures.append(f"{ranks} {dtype} {route}: all-gather in place")
    _route("gloo's own")


def _train(stage: int, route: str) -> dict[str, torch.Tensor]:
    """Four steps of the tiny GPT-2 at `stage` with every collective on `route`: full weights."""
    _route(route)
    model = build_model("gpt2")
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    engine = hf_zero.initialize(model, optimizer, {"stage": stage, "gradient_clipping": 1.0})
    samples = make_samples("gpt2", 8 * dist.get_world_size())
    for step in range(4):
        batch = slice_samples(samples, (step * dist.get_world_size() + dist.get_rank()) * 2, 2)
        engine.backward(engine(**batch).loss)
        engine.step()
        engine.zero_grad()
    weights = {name: tensor.clone() for name, tensor in engine.full_state_dict().items()}
    engine.close()
    return weights


def _norm(tensors: dict[str, torch.Tensor]) -> float:
    return sum(tensor.double().square().sum() for tensor in tensors.values()).sqrt().item()


def main() -> None:
    out = sys.argv[1]
    dist.init_process_group("gloo")
    results: dict[str, list[str]] = {}
    failures: list[str] = []
    _check_collectives(dist.group.WORLD, list(range(dist.get_world_size())), failures)
    pair = dist.new_group([0, 2])
    if dist.get_rank() in (0, 2):
        _check_collectives(pair, [0, 2], failures)
    results["collectives"] = failures
    initial = {name: tensor.clone() for name, tensor in build_model("gpt2").state_dict().items()}
    for stage in (1, 2, 3):
        own = _train(stage, "gloo's own")
        moved = _norm({name: tensor - initial[name] for name, tensor in own.items()})
        results[f"stage{stage}"] = []
        for route in ("per tensor", "whole batch"):
            # Summation order differs from gloo's on 3 ranks (rank order here), so the bits may;
            # a chunk from the wrong rank or a lost contribution is off by the update's own size.
            rerouted = _train(stage, route)
            error = _norm({name: rerouted[name] - tensor for name, tensor in own.items()}) / moved
            if not error < 1e-4:
                results[f"stage{stage}"].append(f"{route}: weights off by {error:.3g} of their movement")
    _route("gloo's own")
    every_rank: list = [None] * dist.get_world_size()
    dist.all_gather_object(every_rank, results)
    if dist.get_rank() == 0:
        merged = {
            key: [f"rank {r}: {f}" for r, res in enumerate(every_rank) for f in res[key]] for key in results
        }
        with open(out, "w") as file:
            json.dump(merged, file)
    exit_cleanly()


if __name__ == "__main__":
    main()
