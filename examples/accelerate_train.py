"""An ordinary Accelerate training loop, sharded by hf_zero: the one change is `ZeroAccelerator`
in place of `Accelerator` (plus its `zero_config`).

    accelerate launch --config_file examples/accelerate_config.yaml examples/accelerate_train.py
    accelerate launch --multi_gpu --num_processes 2 examples/accelerate_train.py      # same, flags
    torchrun --nproc_per_node 2 examples/accelerate_train.py                          # or torchrun
    python examples/accelerate_train.py                                               # one GPU

One process per GPU (`--num_processes` / `--nproc_per_node` = the number of GPUs). Nothing here
names a device: `prepare` shards the model onto each process's `accelerator.device` and the
prepared data loaders put the batches there. On a machine without GPUs the same commands start CPU
processes (gloo). Trains a small GPT-2 on a generated Markov-chain corpus with gradient
accumulation, evaluates with `gather_for_metrics`, saves its state with `save_state` and the model
with `save_model`. `--out DIR` picks the output folder; `--stage`, `--steps` and `--offload`
change the run.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from transformers import GPT2Config, GPT2LMHeadModel

from hf_zero import ZeroAccelerator
from hf_zero.cli.data import causal_lm_dataset, markov_corpus

VOCAB, LENGTH = 256, 32


def build_model() -> GPT2LMHeadModel:
    """A small GPT-2, without dropout so that runs compare step for step."""
    config = GPT2Config(
        n_layer=2, n_embd=64, n_head=4, n_positions=LENGTH, vocab_size=VOCAB,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    return GPT2LMHeadModel(config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/accelerate-example")
    parser.add_argument("--stage", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--offload", choices=["none", "cpu"], default="none")
    options = parser.parse_args()

    accelerator = ZeroAccelerator(
        zero_config={"stage": options.stage, "offload_optimizer": options.offload},
        gradient_accumulation_steps=2,
        cpu=not torch.cuda.is_available(),  # several CPU processes need it (see the README)
    )
    torch.manual_seed(0)  # every process builds the same model (rank 0's weights are broadcast anyway)
    model = build_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    tokens = markov_corpus(2048 + 256, LENGTH, VOCAB, branching=4, seed=0)
    train = DataLoader(causal_lm_dataset(tokens[:2048]), batch_size=8)
    evaluation = DataLoader(causal_lm_dataset(tokens[2048:]), batch_size=32)
    model, optimizer, train, evaluation = accelerator.prepare(model, optimizer, train, evaluation)

    model.train()
    losses, batches = [], iter(train)
    for _ in range(options.steps * accelerator.gradient_accumulation_steps):
        with accelerator.accumulate(model):
            loss = model(**next(batches)).loss
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad()
        if accelerator.sync_gradients:
            losses.append(accelerator.reduce(loss.detach(), reduction="mean").item())

    model.eval()
    eval_losses = []
    for batch in evaluation:
        with torch.no_grad():
            per_sample = model(**batch).loss.repeat(batch["input_ids"].shape[0])
        eval_losses.append(accelerator.gather_for_metrics(per_sample))
    eval_loss = torch.cat(eval_losses).mean().item()

    out = Path(options.out)
    accelerator.save_state(str(out / "state"))
    accelerator.save_model(model, str(out / "model"))
    if accelerator.is_main_process:
        report = {"losses": losses, "eval_loss": eval_loss, "perplexity": math.exp(eval_loss)}
        (out / "report.json").write_text(json.dumps(report))
        print(f"step losses {losses[0]:.3f} -> {losses[-1]:.3f}; eval loss {eval_loss:.3f}; saved to {out}")
    accelerator.end_training()


if __name__ == "__main__":
    main()
