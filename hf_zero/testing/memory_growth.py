"""Launched by the memory-growth test: does anything grow with every step?

    torchrun --nproc_per_node 2 -m hf_zero.testing.memory_growth OUT.json STEPS [CASE ...]

Each case trains an 8-layer Llama of the tiny models' width for `WARMUP + STEPS` steps, each step
a training micro-batch of 2 x 64 tokens (forward, backward, optimizer step) and an
evaluation forward (in eval mode, under `torch.no_grad()` as in `Trainer.evaluate`), and samples the process's resident memory (after
`malloc_trim`, so freed heap pages do not count) and, on a GPU, the allocated device memory every
`EVERY` steps after the warm-up. Rank 0 writes, for every rank and case, the growth per step of
each (the median slope between samples, robust to a few noisy samples). A stage-3 forward that kept its autograd graph alive through the gather hooks
grew about 310 KiB per step here; a run without a leak gains up to about 11 KiB per step at stages
1-2 and 30 KiB at stage 3 over its first 36 steps, while its allocator settles (down to about 1 KiB
by step 250).

Cases: stages 1-3, stage 3 under activation checkpointing (reentrant and not), stage 3 with its
evaluation forwards under autograd (no backward follows them), stage 3 with the optimizer and the
parameters offloaded to the CPU.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import sys

import torch
import torch.distributed as dist
from transformers import LlamaForCausalLM

import hf_zero

from .launch import exit_cleanly
from .tiny_models import VOCAB, llama_config

WARMUP = 12
EVERY = 1
# Stage 0 reduces through the same whole-gradient reducer as stage 1, and stage 2's optimizer
# offload streams through the same host staging as stage 3's: neither has a case of its own.
CASES: dict[str, dict] = {
    "stage1": {"zero": {"stage": 1}},
    "stage2": {"zero": {"stage": 2}},
    "stage3": {"zero": {"stage": 3}},
    "stage3-checkpointing": {"zero": {"stage": 3}, "checkpointing": {"use_reentrant": False}},
    "stage3-checkpointing-reentrant": {"zero": {"stage": 3}, "checkpointing": {"use_reentrant": True}},
    "stage3-eval-with-grad": {"zero": {"stage": 3}, "eval_with_grad": True},
    "stage3-offload": {"zero": {"stage": 3, "offload_optimizer": "cpu", "offload_params": "cpu"}},
}

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
_malloc_trim = getattr(_libc, "malloc_trim", None)  # glibc only
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def fix_mmap_threshold() -> None:
    """Serve every allocation of 128 KiB or more from its own mapping, returned when freed (glibc).

    By default glibc raises that threshold to the largest block freed so far, after which
    megabyte-sized temporaries (gradient buckets, reduce-scatter outputs) come from the heap and
    move the resident size up and down by megabytes from step to step: noise a leak test must not
    read as growth. A fixed threshold also turns off that adjustment."""
    mallopt = getattr(_libc, "mallopt", None)
    if mallopt is not None:
        mallopt(_M_MMAP_THRESHOLD, 128 * 1024)


def resident_bytes() -> int:
    """The process's resident memory, after handing freed heap pages back to the kernel."""
    if _malloc_trim is not None:
        _malloc_trim(0)
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def growth_per_step(samples: list[tuple[int, int]]) -> float:
    """Bytes gained per step: the median of the slopes between every two samples (Theil-Sen), so a
    few samples that the allocator or a busy machine pushed up or down do not tilt it, while a
    leak, which adds the same bytes every step, shows in full."""
    slopes = sorted(
        (y2 - y1) / (x2 - x1) for i, (x1, y1) in enumerate(samples) for x2, y2 in samples[i + 1 :] if x2 != x1
    )
    middle = len(slopes) // 2
    return slopes[middle] if len(slopes) % 2 else (slopes[middle - 1] + slopes[middle]) / 2


def _model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(llama_config(layers=8))


def measure(name: str, steps: int, device: torch.device) -> dict[str, float]:
    """Train case `name` and return its growth per step (host, and device where there is one)."""
    case = CASES[name]
    model = _model().to(device)
    if "checkpointing" in case:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=case["checkpointing"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    engine = hf_zero.initialize(model, optimizer, case["zero"])
    # Longer sequences than the tiny models' usual 16 tokens: a leaked graph then shows clearly.
    ids = torch.randint(0, VOCAB, (4, 2, 64), generator=torch.Generator().manual_seed(0)).to(device)
    host: list[tuple[int, int]] = []
    allocated: list[tuple[int, int]] = []
    on_gpu = device.type == "cuda"
    for step in range(WARMUP + steps):
        batch = {"input_ids": ids[step % 4], "labels": ids[step % 4]}
        engine.backward(engine(**batch).loss)
        engine.step()
        engine.zero_grad()
        engine.module.eval()
        with torch.set_grad_enabled(case.get("eval_with_grad", False)):  # Trainer.evaluate: no grad
            engine(**batch)
        engine.module.train()
        if step >= WARMUP and (step - WARMUP) % EVERY == 0:
            host.append((step, resident_bytes()))
            if on_gpu:
                torch.cuda.synchronize()
                allocated.append((step, torch.cuda.memory_allocated()))
    del engine, optimizer, model
    result = {"host": growth_per_step(host)}
    if on_gpu:
        result["device"] = growth_per_step(allocated)
    return result


def main() -> None:
    fix_mmap_threshold()
    out, steps, names = sys.argv[1], int(sys.argv[2]), sys.argv[3:] or list(CASES)
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl")
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    results = {name: measure(name, steps, device) for name in names}
    every_rank: list = [None] * dist.get_world_size()
    dist.all_gather_object(every_rank, results)
    if dist.get_rank() == 0:
        with open(out, "w") as file:
            json.dump(every_rank, file)
    exit_cleanly()


if __name__ == "__main__":
    main()
