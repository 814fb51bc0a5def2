"""Launched by `tests/test_collectives.py`: gloo's rerouted reduce-scatter and all-gather
(`core/distributed.py`, `GLOO_REROUTE_BYTES`) give what gloo's own collectives give.

    torchrun --nproc_per_node 3 -m hf_zero.testing.collective_checks OUT.json

1. The collectives alone, on every rank and on a sub-group of ranks {0, 2} (whose broadcasts must
   name global ranks): batches of separate tensors and of adjacent views of one buffer (stage 1's
   buckets), in place and not, fp32, bf16 and int8 (ZeRO++'s gathers). The values are small
   integers, so every order of summation gives the same bits: each route is compared with a
   reference built from every rank's inputs, exactly.
2. The engine at stages 1, 2 and 3: the same training with every collective rerouted and with
   none, compared weight by weight.

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

ROUTES = {"rerouted": 0, "gloo's own": 2**62}


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
        for route, threshold in ROUTES.items():
            hf_dist.GLOO_REROUTE_BYTES = threshold
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
        for route, threshold in ROUTES.items():
            hf_dist.GLOO_REROUTE_BYTES = threshold
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
    hf_dist.GLOO_REROUTE_BYTES = ROUTES["gloo's own"]


def _train(stage: int, threshold: int) -> dict[str, torch.Tensor]:
    """Four steps of the tiny GPT-2 at `stage` with `GLOO_REROUTE_BYTES = threshold`: full weights."""
    hf_dist.GLOO_REROUTE_BYTES = threshold
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
    for stage in (1, 2, 3):
        rerouted, own = _train(stage, ROUTES["rerouted"]), _train(stage, ROUTES["gloo's own"])
        results[f"stage{stage}"] = [
            f"{name}: {(rerouted[name] - tensor).abs().max().item():.3g}"
            for name, tensor in own.items()
            if not torch.allclose(rerouted[name], tensor, rtol=1e-6, atol=1e-7)
        ]
    hf_dist.GLOO_REROUTE_BYTES = ROUTES["gloo's own"]
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
