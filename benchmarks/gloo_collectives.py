"""gloo's reduce-scatter and all-gather against the routes hf_zero takes for large ones
(`hf_zero/core/distributed.py`, `GLOO_REROUTE_BYTES`): for a reduce-scatter, an all-reduce of the
input (then a copy of this rank's chunk) or point-to-point messages (each rank sends every other
its chunk, then adds what it received); for an all-gather, one broadcast from each rank.

    python benchmarks/gloo_collectives.py [--ranks 2 3 4] [--mib 0.5 8 40]

For each world size, each full-tensor size (MiB of fp32, rounded to a multiple of the world size)
and each way, the mean of 3 timed calls after one warm-up, a barrier around them; rank 0 prints one
JSON line per world size and size, in milliseconds. The script starts torchrun itself.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Callable

import torch
import torch.distributed as dist

from hf_zero.testing.launch import local_launch_command


def _mean_ms(function: Callable[[], object], repeats: int = 3) -> float:
    function()
    dist.barrier()
    start = time.perf_counter()
    for _ in range(repeats):
        function()
    dist.barrier()
    return (time.perf_counter() - start) / repeats * 1e3


def measure(mib: float) -> dict[str, float]:
    """Milliseconds of each way to reduce-scatter and all-gather `mib` MiB of fp32."""
    rank, world = dist.get_rank(), dist.get_world_size()
    chunk = max(1, round(mib * 2**20 / 4 / world))
    full, shard = torch.randn(chunk * world), torch.randn(chunk)
    own = slice(rank * chunk, (rank + 1) * chunk)

    def reduce_scatter_by_all_reduce() -> None:
        dist.all_reduce(full)
        shard.copy_(full[own])

    received = torch.empty(world - 1, chunk)

    def reduce_scatter_by_exchange() -> None:
        works = []
        for step in range(1, world):
            to, source = (rank + step) % world, (rank - step) % world
            works.append(dist.isend(full[to * chunk : (to + 1) * chunk], to))
            works.append(dist.irecv(received[step - 1], source))
        for work in works:
            work.wait()
        torch.add(full[own], received[0], out=shard)
        for row in received[1:]:
            shard.add_(row)

    def all_gather_by_broadcasts() -> None:
        full[own].copy_(shard)
        works = [dist.broadcast(full[r * chunk : (r + 1) * chunk], r, async_op=True) for r in range(world)]
        for work in works:
            work.wait()

    return {
        "all_reduce": _mean_ms(lambda: dist.all_reduce(full)),
        "reduce_scatter": _mean_ms(lambda: dist.reduce_scatter_tensor(shard, full)),
        "reduce_scatter_by_all_reduce": _mean_ms(reduce_scatter_by_all_reduce),
        "reduce_scatter_by_exchange": _mean_ms(reduce_scatter_by_exchange),
        "all_gather": _mean_ms(lambda: dist.all_gather_into_tensor(full, shard)),
        "all_gather_by_broadcasts": _mean_ms(all_gather_by_broadcasts),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--mib", type=float, nargs="+", default=[0.5, 8.0, 40.0])
    options = parser.parse_args()
    if "LOCAL_RANK" not in os.environ:
        env = dict(os.environ, OMP_NUM_THREADS="1")
        for ranks in options.ranks:
            args = [sys.argv[0], "--ranks", str(ranks), "--mib", *map(str, options.mib)]
            code = subprocess.run(local_launch_command(ranks, args), env=env).returncode
            if code:
                raise SystemExit(code)
        return
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch's renamed collectives
    dist.init_process_group("gloo")
    for mib in options.mib:
        row = {name: round(ms, 1) for name, ms in measure(mib).items()}
        if dist.get_rank() == 0:
            print(json.dumps({"ranks": dist.get_world_size(), "mib": mib, **row}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
