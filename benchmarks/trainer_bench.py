"""Step time and peak GPU memory: plain `transformers.Trainer` against `hf_zero.ZeroTrainer`.

    python benchmarks/trainer_bench.py MODEL MODE [STEPS] [--precision bf16|fp16] [--liger]
        [--offload cpu|nvme] [--offload-params] [--delayed] [--nvme-path DIR]

MODEL: gpt2-124m (16 x 1024 tokens) | llama-1b (Llama-1.1B config, 4 x 2048 tokens) | tiny (CPU smoke run)
MODE : plain | zero0 | zero1 | zero2 | zero3
Settings match the anchor script (benchmarks/anchor_bench.py, which takes its models and data from
here): bf16 (or fp16 with --precision; on CPU fp32 unless fp16 is asked for), fused AdamW, lr 1e-4, weight decay 0.01, max_grad_norm 1.0,
random tokens. --liger switches on the Trainer's `use_liger_kernel` (Llama only). --offload moves
the fp32 masters and optimizer state to host memory or an NVMe swap file (--nvme-path, default a
temporary folder), --offload-params (zero3) the 16-bit shards to the host, --delayed takes the
host update off the critical path (offload_overlap="delayed"). Prints one JSON line: median step
ms, tokens/s, peak GB (max_memory_allocated), peak host RSS GB, final logged loss.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import tempfile
import time

import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from hf_zero import ZeroTrainer

MODELS = {
    "gpt2-124m": (lambda: GPT2Config(n_positions=1024), 1024, 16),
    "llama-1b": (
        lambda: LlamaConfig(
            hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
            num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048,
        ),
        2048,
        4,
    ),
    "tiny": (lambda: GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=64, vocab_size=256), 64, 4),
}  # fmt: skip


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, count: int, length: int, vocab: int) -> None:
        self.tokens = torch.randint(0, vocab, (count, length), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.tokens[index], "labels": self.tokens[index]}


class StepTimer(TrainerCallback):
    """Wall time of each optimizer step, synchronised with the GPU."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.loss = None
        self._start = 0.0

    def _sync(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def on_step_begin(self, args, state, control, **kwargs):
        self._sync()
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self._sync()
        self.times.append(time.perf_counter() - self._start)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.loss = logs["loss"]


def _zero_config(mode: str, options: argparse.Namespace) -> dict:
    config: dict = {"stage": int(mode.removeprefix("zero"))}
    if options.offload:
        config["offload_optimizer"] = options.offload
    if options.offload == "nvme":
        config["nvme_path"] = options.nvme_path or tempfile.mkdtemp()
    if options.offload_params:
        config["offload_params"] = "cpu"
    if options.delayed:
        config["offload_overlap"] = "delayed"
    return config


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", choices=sorted(MODELS))
    parser.add_argument("mode", choices=["plain", "zero0", "zero1", "zero2", "zero3"])
    parser.add_argument("steps", type=int, nargs="?", default=20)
    parser.add_argument("--precision", choices=["bf16", "fp16"], default="bf16")
    parser.add_argument("--liger", action="store_true")
    parser.add_argument("--offload", choices=["cpu", "nvme"], default=None)
    parser.add_argument("--offload-params", action="store_true")
    parser.add_argument("--delayed", action="store_true")
    parser.add_argument("--nvme-path", default=None)
    options = parser.parse_args()
    name, mode, steps = options.model, options.mode, options.steps
    make_config, length, batch = MODELS[name]
    config = make_config()
    cuda = torch.cuda.is_available()
    torch.manual_seed(0)
    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=batch, max_steps=steps, learning_rate=1e-4,
        weight_decay=0.01, bf16=cuda and options.precision == "bf16", fp16=options.precision == "fp16",
        use_liger_kernel=options.liger, logging_steps=5, save_strategy="no", report_to=[], dataloader_num_workers=0,
        max_grad_norm=1.0, disable_tqdm=True, optim="adamw_torch_fused" if cuda else "adamw_torch", use_cpu=not cuda,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    timer = StepTimer()
    dataset = RandomTokens(batch * steps, length, config.vocab_size)
    if mode == "plain":
        trainer = Trainer(model=model, args=args, train_dataset=dataset, callbacks=[timer])
    else:
        trainer = ZeroTrainer(
            model=model,
            args=args,
            train_dataset=dataset,
            callbacks=[timer],
            zero_config=_zero_config(mode, options),
        )
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    settled = timer.times[2:] if len(timer.times) <= 8 else timer.times[5:]
    median = statistics.median(settled)
    peak = round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None
    print(
        json.dumps(
            {
                "model": name, "mode": mode, "precision": options.precision if cuda or options.precision == "fp16"
                else "fp32", "liger": options.liger, "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
                "step_ms": round(median * 1000, 1), "tok_s": round(batch * length / median),
                "peak_GB": peak, "loss": timer.loss, "steps": len(timer.times),
                "zero_config": None if mode == "plain" else _zero_config(mode, options),
                "host_peak_GB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
                "device": torch.cuda.get_device_name(0) if cuda else "cpu",
            }
        ),
        flush=True,
    )  # fmt: skip


if __name__ == "__main__":
    main()
