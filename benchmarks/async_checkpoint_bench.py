"""How long a checkpoint save stops training, synchronous against asynchronous.

    torchrun --nproc_per_node 2 benchmarks/async_checkpoint_bench.py [--model gpt2] [--folder DIR] [--saves 3]

Builds the model from its config (GPT-2 124M by default: no download), trains one step at stage
2 with AdamW so the optimizer state exists, then saves `--saves` checkpoints each way into
`--folder`: synchronous ones (the save call is the stall), and asynchronous ones, each followed by
`--steps-during` training steps while its thread writes, then `wait_for_checkpoint()`. Rank 0
prints, per way, the median time the training thread spent in the save call (the stall) and until
the checkpoint was complete (for async: after those steps), a step's time alone and while a save
is written, and the snapshot's host bytes.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
from transformers import AutoConfig, AutoModelForCausalLM

import hf_zero


def _step(engine: hf_zero.ZeroEngine, batch: dict[str, torch.Tensor]) -> float:
    start = time.perf_counter()
    engine.backward(engine(**batch).loss)
    engine.step()
    engine.zero_grad()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt2", help="a config name known to transformers' AutoConfig")
    parser.add_argument(
        "--folder", default=None, help="where the checkpoints go (default: a temporary folder)"
    )
    parser.add_argument("--saves", type=int, default=3)
    parser.add_argument("--steps-during", type=int, default=3, help="steps taken while an async save writes")
    parser.add_argument("--tokens", type=int, default=64, help="tokens per rank per step")
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    config = AutoConfig.for_model(args.model)
    model = AutoModelForCausalLM.from_config(config)
    engine = hf_zero.initialize(model, torch.optim.AdamW(model.parameters(), lr=1e-4), {"stage": 2})
    ids = torch.randint(0, config.vocab_size, (1, args.tokens))
    batch = {"input_ids": ids, "labels": ids}
    _step(engine, batch)
    alone = statistics.median(_step(engine, batch) for _ in range(3))

    folder = args.folder or tempfile.mkdtemp(prefix="hf_zero-async-bench-")
    folder = [folder]
    dist.broadcast_object_list(folder)
    results = {}
    for mode in ("sync", "async"):
        stalls, totals, during = [], [], []
        for index in range(args.saves):
            target = os.path.join(folder[0], f"{mode}-{index}")
            dist.barrier()
            start = time.perf_counter()
            engine.save_checkpoint(target, asynchronous=mode == "async")
            stalls.append(time.perf_counter() - start)
            if mode == "async":
                # The same number of steps on every rank (they are collectives) while the thread writes.
                during.extend(_step(engine, batch) for _ in range(args.steps_during))
                engine.wait_for_checkpoint()
            totals.append(time.perf_counter() - start)
            dist.barrier()
            if rank == 0:
                shutil.rmtree(target)
        results[mode] = (statistics.median(stalls), statistics.median(totals), during)
    if rank == 0:
        size = sum(p.numel() for p in model.parameters())
        print(f"model {args.model}: {size / 1e6:.1f}M parameters, {dist.get_world_size()} processes, stage 2")
        print(f"step alone: {alone * 1000:.0f} ms")
        for mode, (stall, total, during) in results.items():
            line = f"{mode:5s}: training thread stalled {stall:.3f} s per save; checkpoint complete after {total:.3f} s"
            if during:
                line += f"; {len(during)} steps ran during the write, median {statistics.median(during) * 1000:.0f} ms"
            print(line)
        print(f"stall ratio async/sync: {results['async'][0] / results['sync'][0]:.3f}")
        print(f"snapshot host bytes on rank 0: {engine.background_saves.snapshot.nbytes / 2**20:.0f} MiB")
    engine.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
