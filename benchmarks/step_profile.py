"""One training step of hf_zero, timed by phase, with the operations that took the time.

    python benchmarks/step_profile.py MODEL [--stage N] [--precision bf16|fp16|fp32] [--warmup K]

MODEL as in trainer_bench.py (gpt2-124m, llama-1b, tiny). The model trains in a plain loop through
`hf_zero.initialize` (fused AdamW, clipping at 1.0, the Trainer's settings) for K warm-up steps,
then one step is timed phase by phase, each phase ended by a device synchronisation: forward,
backward (with the gradient reduction), clip, optimizer step, zero_grad. The same step runs again
under `torch.profiler`, and the operations with the most self time on the device (on the CPU
where there is no GPU) are listed. Prints one JSON line. Where a trainer_bench.py number misses
its target, this says which phase holds the time.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile
from trainer_bench import MODELS, RandomTokens  # the same workload as the Trainer numbers
from transformers import AutoModelForCausalLM

import hf_zero

TOP_OPERATIONS = 12


def _timed(sync: Callable[[], None], fn: Callable[[], object]) -> tuple[object, float]:
    sync()
    start = time.perf_counter()
    result = fn()
    sync()
    return result, (time.perf_counter() - start) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", choices=sorted(MODELS))
    parser.add_argument("--stage", type=int, choices=[0, 1, 2, 3], default=2)
    parser.add_argument("--precision", choices=["bf16", "fp16", "fp32"], default=None)
    parser.add_argument("--warmup", type=int, default=3)
    options = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    precision = options.precision or ("bf16" if cuda else "fp32")
    make_config, length, batch = MODELS[options.model]
    config = make_config()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01, fused=cuda)
    engine = hf_zero.initialize(model, optimizer, {"stage": options.stage, "precision": precision})
    tokens = RandomTokens(batch, length, config.vocab_size).tokens.to(device)
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def step(phases: dict[str, float] | None) -> None:
        def run(name: str, fn: Callable[[], object]) -> object:
            if phases is None:
                return fn()
            result, ms = _timed(sync, fn)
            phases[name] = round(ms, 2)
            return result

        loss = run("forward", lambda: engine(input_ids=tokens, labels=tokens).loss)
        run("backward", lambda: engine.backward(loss))
        run("clip", lambda: engine.clip_grad_norm_(1.0))
        run("step", engine.step)
        run("zero_grad", engine.zero_grad)

    for _ in range(options.warmup):
        step(None)
    phases: dict[str, float] = {}
    step(phases)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as profiler:
        step(None)
        sync()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = sorted(profiler.key_averages(), key=lambda e: getattr(e, key), reverse=True)
    top = [
        {"op": e.key, "calls": e.count, "self_ms": round(getattr(e, key) / 1e3, 3)}
        for e in events[:TOP_OPERATIONS]
    ]
    print(
        json.dumps(
            {
                "model": options.model, "stage": options.stage, "precision": precision,
                "step_ms": round(sum(phases.values()), 2), "phases_ms": phases, "top_ops": top,
                "timed_by": "device" if cuda else "cpu",
                "device": torch.cuda.get_device_name(0) if cuda else "cpu",
            }
        ),
        flush=True,
    )  # fmt: skip
    engine.close()


if __name__ == "__main__":
    main()
