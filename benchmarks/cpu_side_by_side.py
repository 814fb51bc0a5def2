"""Step time on CPU with 2 gloo ranks, side by side: DDP, FSDP2 and hf_zero stages 1-3 (DeepSpeed
ZeRO-2/3 too where `deepspeed` is installed), on two workloads, fp32, AdamW.

    python benchmarks/cpu_side_by_side.py [--workload overhead compute] [--steps 15]

- overhead: a Llama config with 32 layers of width 64, 2 x 32 tokens per rank. The arithmetic is
  tiny, so the step time is the framework's host work and its number of collectives.
- compute: a GPT-2 config with 6 layers of width 512, 4 x 256 tokens per rank, where the matrix
  products dominate.

Every mode builds a model with the same weights, and all of them are alive at once; the modes then
take turns step by step (2 warm-up steps each, then `steps` timed ones, a barrier before and after
each), and each step time is divided by DDP's of the same turn, so the machine's drift, which is
slower than a turn, cancels. hf_zero's gradient buckets are as big as DDP's (25 MiB;
`--reduce-bucket-size` in elements). Prints one JSON line per workload and mode: median step ms,
the median and quartiles of the ratios to DDP, and for hf_zero the collectives it issued per step.
The script starts torchrun itself (2 processes) unless it already runs under it. Use the ratios:
this is a shared, noisy machine.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

import hf_zero
from hf_zero.testing.launch import local_launch_command

VOCAB = 4096
# DDP's default bucket_cap_mb (25 MiB) in fp32 elements: hf_zero's buckets get the same size.
DDP_BUCKET_ELEMENTS = 25 * 2**20 // 4
WORKLOADS = {
    "overhead": (
        lambda: LlamaConfig(
            hidden_size=64, intermediate_size=256, num_hidden_layers=32, num_attention_heads=4,
            num_key_value_heads=4, vocab_size=VOCAB, max_position_embeddings=64,
        ),
        2, 32,
    ),
    "compute": (
        lambda: GPT2Config(
            n_layer=6, n_embd=512, n_head=8, n_positions=256, vocab_size=VOCAB, bos_token_id=0, eos_token_id=0
        ),
        4, 256,
    ),
}  # fmt: skip
MODES = ["ddp", "fsdp2", "fsdp2_keep", "hf_zero1", "hf_zero2", "hf_zero3"]
if importlib.util.find_spec("deepspeed") is not None:
    MODES += ["deepspeed2", "deepspeed3"]


class Trainee:
    """One mode's model and training step: `step(batch)` runs forward, backward and the update."""

    def __init__(self, mode: str, workload: str, zero_config: dict) -> None:
        make_config = WORKLOADS[workload][0]
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(make_config(), dtype=torch.float32)
        model.config.use_cache = False
        self.mode, self.engine, self.trace = mode, None, None
        layers = model.model.layers if hasattr(model, "model") else model.transformer.h
        if mode == "ddp":
            self.model = torch.nn.parallel.DistributedDataParallel(model)
            self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4, fused=True)
        elif mode.startswith("fsdp2"):
            from torch.distributed.fsdp import fully_shard

            reshard = mode == "fsdp2"
            for layer in layers:
                fully_shard(layer, reshard_after_forward=reshard)
            fully_shard(model, reshard_after_forward=reshard)
            self.model = model
            self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        elif mode.startswith("hf_zero"):
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
            self.engine = hf_zero.initialize(model, optimizer, {**zero_config, "stage": int(mode[-1])})
            self.model, self.optimizer = self.engine, optimizer
            self.trace = self.engine.trace_collectives()
        else:
            import deepspeed

            config = {
                "train_micro_batch_size_per_gpu": WORKLOADS[workload][1],
                "zero_optimization": {"stage": int(mode[-1])},
                "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}},
            }
            self.model, self.optimizer, _, _ = deepspeed.initialize(
                model=model, model_parameters=model.parameters(), config=config
            )

    def step(self, batch: torch.Tensor) -> None:
        loss = self.model(input_ids=batch, labels=batch).loss
        if self.mode.startswith("deepspeed"):
            self.model.backward(loss)
            self.model.step()
            return
        if self.engine is not None:
            self.engine.backward(loss)
        else:
            loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()


WARMUP = 2


def _quartiles(values: list[float]) -> list[float]:
    """The first and third quartiles of `values`."""
    cuts = statistics.quantiles(values, n=4)
    return [cuts[0], cuts[2]]


def run(workloads: list[str], steps: int, zero_config: dict, emit: Callable[[dict], None]) -> None:
    for workload in workloads:
        _, batch_size, length = WORKLOADS[workload]
        generator = torch.Generator().manual_seed(1 + dist.get_rank())
        batches = torch.randint(0, VOCAB, (WARMUP + steps, batch_size, length), generator=generator)
        trainees = {mode: Trainee(mode, workload, zero_config) for mode in MODES}
        seconds: dict[str, list[float]] = {mode: [] for mode in MODES}
        for index, batch in enumerate(batches):
            for mode, trainee in trainees.items():
                if index == WARMUP and trainee.trace is not None:
                    trainee.trace.clear()
                dist.barrier()
                start = time.perf_counter()
                trainee.step(batch)
                dist.barrier()
                if index >= WARMUP:
                    seconds[mode].append(time.perf_counter() - start)
        for mode, trainee in trainees.items():
            # One ratio per turn: the modes' steps of one turn ran within seconds of each other.
            ratios = [t / d for t, d in zip(seconds[mode], seconds["ddp"], strict=True)]
            emit(
                {
                    "workload": workload, "mode": mode, "steps": steps,
                    "step_ms": round(statistics.median(seconds[mode]) * 1e3, 2),
                    "x_ddp": round(statistics.median(ratios), 3),
                    "x_ddp_quartiles": [round(r, 3) for r in _quartiles(ratios)],
                    "collectives_per_step": len(trainee.trace) / steps if trainee.trace is not None else None,
                }
            )  # fmt: skip
            trainee.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", nargs="+", choices=sorted(WORKLOADS), default=["overhead", "compute"])
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument(
        "--reduce-bucket-size", type=int, default=DDP_BUCKET_ELEMENTS,
        help="hf_zero's gradient bucket, in elements (default: DDP's 25 MiB of fp32)",
    )  # fmt: skip
    options = parser.parse_args()
    if "LOCAL_RANK" not in os.environ:
        command = local_launch_command(2, sys.argv)
        raise SystemExit(subprocess.run(command, env=dict(os.environ, OMP_NUM_THREADS="1")).returncode)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    run(
        options.workload,
        options.steps,
        {"reduce_bucket_size": options.reduce_bucket_size},
        lambda row: rank == 0 and print(json.dumps(row), flush=True),
    )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
