"""The anchors hf_zero is measured against: the plain `transformers.Trainer`, DeepSpeed ZeRO and
FSDP2, each through the Trainer, on the workload of `trainer_bench.py` (its model configs, random
tokens and Trainer settings), so the two scripts' numbers compare line by line.

    python benchmarks/anchor_bench.py MODEL MODE [STEPS]

MODEL: gpt2-124m (16 x 1024 tokens) | llama-1b (Llama-1.1B config, 4 x 2048 tokens) | tiny (CPU smoke run)
MODE : plain      the Trainer alone, fused AdamW
       z1 z2 z3   DeepSpeed ZeRO stage 1 / 2 / 3 (its fused Adam, bf16, overlap_comm, contiguous gradients)
       z2off      DeepSpeed ZeRO-2 with the optimizer offloaded to pinned CPU memory (its CPU Adam)
       z3off      DeepSpeed ZeRO-3 with the optimizer and the parameters offloaded to pinned CPU memory
       fsdp2      FSDP2 (full shard, one unit per decoder layer), fused AdamW
       fsdp2off   FSDP2 with CPU offload, AdamW

One process (the anchors are single-GPU numbers); under `torchrun` every rank takes part and rank 0
reports. DeepSpeed modes need the `deepspeed` package (its ops compile on first use: set
`TORCH_CUDA_ARCH_LIST` to the GPU's, e.g. 9.0 for an H100) and a GPU; the plain mode also runs on
CPU (fp32) as a smoke test. Prints one JSON line: median step ms over the settled steps, tokens/s,
peak GB (`torch.cuda.max_memory_allocated`), the last logged loss, wall time.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import tempfile
import time
from typing import Any

import torch
from trainer_bench import MODELS, RandomTokens, StepTimer  # the same workload as hf_zero's numbers
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

DEEPSPEED_MODES = ("z1", "z2", "z3", "z2off", "z3off")
FSDP_MODES = ("fsdp2", "fsdp2off")
MODES = ("plain", *DEEPSPEED_MODES, *FSDP_MODES)


def deepspeed_config(mode: str) -> dict[str, Any]:
    """The DeepSpeed config of a mode; "auto" values come from `TrainingArguments`."""
    zero: dict[str, Any] = {"stage": int(mode[1]), "overlap_comm": True, "contiguous_gradients": True}
    if mode.endswith("off"):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if mode == "z3off":
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {
        "zero_optimization": zero,
        "bf16": {"enabled": True},
        "gradient_clipping": 1.0,
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": "auto", "weight_decay": "auto", "betas": "auto", "eps": "auto"},
        },
    }


def training_arguments(mode: str, steps: int, batch: int, layer_classes: list[str]) -> TrainingArguments:
    """The Trainer settings of `trainer_bench.py`, plus the mode's sharding (FSDP2 wraps each
    instance of `layer_classes`, the model's decoder layers, as one unit)."""
    cuda = torch.cuda.is_available()
    extra: dict[str, Any] = {}
    if mode in DEEPSPEED_MODES:
        extra["deepspeed"] = deepspeed_config(mode)
    elif mode in FSDP_MODES:  # full shard: parameters are freed again after each unit's forward
        extra["fsdp"] = True
        extra["fsdp_config"] = {
            "version": 2,
            "transformer_layer_cls_to_wrap": layer_classes,
            "reshard_after_forward": True,
            "cpu_offload": mode == "fsdp2off",
        }
    # Fused AdamW needs the parameters on the GPU; FSDP2's CPU offload keeps them on the host.
    fused = cuda and mode in ("plain", "fsdp2")
    return TrainingArguments(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=batch, max_steps=steps, learning_rate=1e-4,
        weight_decay=0.01, bf16=cuda, logging_steps=5, save_strategy="no", report_to=[], dataloader_num_workers=0,
        max_grad_norm=1.0, disable_tqdm=True, optim="adamw_torch_fused" if fused else "adamw_torch",
        use_cpu=not cuda, **extra,
    )  # fmt: skip


def _check_runnable(parser: argparse.ArgumentParser, mode: str) -> None:
    if mode == "plain":
        return
    if not torch.cuda.is_available():
        parser.error(f"mode {mode} needs a GPU (only the plain mode runs on CPU, as a smoke test)")
    if mode in DEEPSPEED_MODES and importlib.util.find_spec("deepspeed") is None:
        parser.error(f"mode {mode} needs DeepSpeed: pip install deepspeed")
    # DeepSpeed and FSDP need a process group; one process started without a launcher makes its own.
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", "29511")


def main() -> None:
    parser = argparse.ArgumentParser(
        description="Step time and peak GPU memory of the plain Trainer, DeepSpeed ZeRO and FSDP2 (the anchors).",
        epilog="MODE: plain | z1 | z2 | z3 (DeepSpeed ZeRO) | z2off | z3off (with CPU offload) | fsdp2 | fsdp2off",
    )
    parser.add_argument("model", choices=sorted(MODELS), help="model config and batch (tiny: CPU smoke run)")
    parser.add_argument("mode", choices=MODES, metavar="MODE", help="what shards the model (see below)")
    parser.add_argument("steps", type=int, nargs="?", default=20, help="optimizer steps (default 20)")
    options = parser.parse_args()
    if options.steps < 3:
        parser.error(f"STEPS must be at least 3 (the first two are warm-up), got {options.steps}")
    _check_runnable(parser, options.mode)
    make_config, length, batch = MODELS[options.model]
    config = make_config()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    args = training_arguments(options.mode, options.steps, batch, list(model._no_split_modules))
    parameters = sum(p.numel() for p in model.parameters())
    timer = StepTimer()
    dataset = RandomTokens(batch * options.steps, length, config.vocab_size)
    trainer = Trainer(model=model, args=args, train_dataset=dataset, callbacks=[timer])
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - started
    settled = timer.times[2:] if len(timer.times) <= 8 else timer.times[5:]
    median = statistics.median(settled)
    if args.process_index == 0:
        report = {
            "model": options.model,
            "mode": options.mode,
            "params_M": round(parameters / 1e6, 1),
            "step_ms": round(median * 1000, 1),
            "tok_s": round(batch * length / median),
            "peak_GB": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
            "loss": timer.loss,
            "wall_s": round(wall, 1),
            "steps": len(timer.times),
            "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        }
        print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
