"""Train a tiny GPT-2 with `transformers.Trainer` or `hf_zero.ZeroTrainer` and report what happened.

    python -m hf_zero.testing.trainer_run plain OUT_DIR [--precision bf16]
    torchrun --standalone --nproc_per_node 2 -m hf_zero.testing.trainer_run zero OUT_DIR --stage 2

Both see the same global batch per step (the plain run uses a per-device batch `world` times
larger). The run trains `--steps` optimizer steps with accumulation and clipping, evaluates,
predicts and saves the final model to OUT_DIR/final. With `--resume`, a ZeroTrainer run also
checkpoints halfway and a second trainer resumes from that checkpoint into OUT_DIR/resumed; a third
trains with `load_best_model_at_end` (the first checkpoint being the best) into OUT_DIR/best_final.
Rank 0 writes OUT_DIR/report.json.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from ..integrations.trainer import ZeroTrainer
from .launch import exit_cleanly
from .tiny_models import build_model, make_samples

GLOBAL_BATCH = 4
ACCUMULATION = 2


class TensorDataset(torch.utils.data.Dataset):
    """A dict of equal-length tensors as a map-style dataset of dict rows."""

    def __init__(self, columns: dict[str, torch.Tensor]) -> None:
        self.columns = columns

    def __len__(self) -> int:
        return len(next(iter(self.columns.values())))

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {key: value[index] for key, value in self.columns.items()}


class LogRecorder(TrainerCallback):
    """Keeps every training log line (loss, grad_norm, learning_rate)."""

    def __init__(self) -> None:
        self.logs: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.logs.append(dict(logs))


def _trainer(
    options, out: Path, name: str, max_steps: int, recorder: LogRecorder, save_steps: int | None, **extra
):
    world = int(os.environ.get("WORLD_SIZE", "1"))
    per_device = GLOBAL_BATCH if options.mode == "plain" else GLOBAL_BATCH // world
    args = TrainingArguments(
        output_dir=str(out / name),
        per_device_train_batch_size=per_device,
        per_device_eval_batch_size=per_device,
        gradient_accumulation_steps=ACCUMULATION,
        max_steps=max_steps,
        learning_rate=2e-3,
        warmup_steps=1,
        max_grad_norm=0.5,
        logging_steps=1,
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        report_to=[],
        train_sampling_strategy="sequential",
        use_cpu=not torch.cuda.is_available(),
        bf16=options.precision == "bf16",
        disable_tqdm=True,
        seed=0,
        **extra,
    )
    kwargs = {}
    cls = Trainer
    if options.mode == "zero":
        cls, kwargs = ZeroTrainer, {"zero_config": {"stage": options.stage, "reduce_bucket_size": 6000}}
    return cls(
        model=build_model("gpt2"),
        args=args,
        train_dataset=TensorDataset(make_samples("gpt2", GLOBAL_BATCH * ACCUMULATION * options.steps)),
        eval_dataset=TensorDataset(make_samples("gpt2", 8, seed=7)),
        callbacks=[recorder],
        **kwargs,
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["plain", "zero"])
    parser.add_argument("out", type=Path)
    parser.add_argument("--stage", type=int, default=2)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--resume", action="store_true")
    options = parser.parse_args()

    recorder = LogRecorder()
    save_steps = options.steps // 2 if options.resume else None
    trainer = _trainer(options, options.out, "run", options.steps, recorder, save_steps)
    trainer.train()
    report = {
        "losses": [log["loss"] for log in recorder.logs],
        "grad_norms": [log["grad_norm"] for log in recorder.logs],
        "learning_rates": [log["learning_rate"] for log in recorder.logs],
        "eval_loss": trainer.evaluate()["eval_loss"],
        "prediction_shape": list(trainer.predict(trainer.eval_dataset).predictions.shape),
    }
    trainer.save_model(str(options.out / "final"))
    if options.resume:
        resumed = _trainer(options, options.out, "resume", options.steps, LogRecorder(), None)
        resumed.train(resume_from_checkpoint=str(options.out / "run" / f"checkpoint-{save_steps}"))
        resumed.save_model(str(options.out / "resumed"))
        # The eval loss falls, so "greater is better" makes the first checkpoint the best one: the
        # model saved after training must be that checkpoint's, not the last step's.
        best = _trainer(
            options, options.out, "best", options.steps, LogRecorder(), save_steps,
            eval_strategy="steps", eval_steps=save_steps, load_best_model_at_end=True,
            metric_for_best_model="eval_loss", greater_is_better=True,
        )  # fmt: skip
        best.train()
        best.save_model(str(options.out / "best_final"))
    if trainer.is_world_process_zero():
        (options.out / "report.json").write_text(json.dumps(report))
    exit_cleanly()


if __name__ == "__main__":
    main()
