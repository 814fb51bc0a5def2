"""Train a tiny GPT-2 with `transformers.Trainer` or `hf_zero.ZeroTrainer` and report what happened.

    python -m hf_zero.testing.trainer_run plain OUT_DIR [--precision bf16] [--lora]
    torchrun --standalone --nproc_per_node 2 -m hf_zero.testing.trainer_run zero OUT_DIR --stage 2 \\
        [--lora] [--resume] [--from-plain PLAIN_OUT_DIR/run/checkpoint-3] [--from-pretrained]
    python -m hf_zero.testing.trainer_run many JOBS.json    (or under torchrun)

`many` runs several jobs one after another in one process (one launch), JOBS.json being a list of
the jobs' command lines (`[["plain", "OUT_A"], ["plain", "OUT_B", "--lora"]]`): starting a process
that imports torch, transformers and hf_zero costs seconds of CPU, far more than a job trains.
Each job does exactly what it does alone: before each one the process is put back as it was when
`main` started (RNG states, environment, torch's default dtype and flags, Accelerate's shared
state, transformers' verbosity), and after each one the engines it built are closed (which puts
back what they patched, see `hf_zero.engine.user_paths`).

Both see the same global batch per step (the plain run uses a per-device batch `world` times
larger) of sequences from a Markov chain, so the loss has somewhere to fall. The run trains
`--steps` optimizer steps with accumulation and clipping, checkpoints halfway (OUT_DIR/run),
evaluates, predicts and saves the final model to OUT_DIR/final. `--lora` trains a LoRA adapter
(PEFT) on the frozen model instead, and every save is an adapter folder. `--muon` trains with Muon
for the hidden matrices and AdamW for the rest: the plain Trainer through the optimizer factory
`hf_zero.MuonWithAdamW`, ZeroTrainer through `optimizer_cls_and_kwargs=(torch.optim.Muon, ...)`.

With `--resume`, a ZeroTrainer run then also:
- resumes from its halfway checkpoint into OUT_DIR/resumed;
- tries to resume from a copy of that checkpoint stripped of its optimizer and scheduler files,
  which must be refused (the error goes into the report);
- trains with `load_best_model_at_end` (the first checkpoint being the best) into OUT_DIR/best_final.
`--resume-same` runs the first of these only. With `--from-plain CKPT`, a ZeroTrainer resumes from a plain Trainer's checkpoint into
OUT_DIR/from_plain. With `--from-pretrained`, the model is the same GPT-2, saved to
OUT_DIR/pretrained and loaded with `hf_zero.from_pretrained` for the run's ZeRO stage (at stage 3
each rank reads only its shard of it). Rank 0 writes OUT_DIR/report.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from accelerate.state import AcceleratorState
from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments
from transformers.utils import logging as transformers_logging

from ..cli.data import markov_corpus
from ..hub.loading import from_pretrained
from ..integrations.muon import MuonWithAdamW
from ..integrations.trainer import ZeroTrainer
from .launch import exit_cleanly
from .tiny_models import SEQ_LEN, VOCAB, build_model

GLOBAL_BATCH = 4
ACCUMULATION = 2
EVAL_SAMPLES = 8
LEARNING_RATE = {"full": 2e-3, "lora": 3e-2}  # LoRA moves few weights: a larger step shows its progress
LORA_TARGETS = ["c_attn", "c_fc"]
MUON = {"lr": 0.02, "momentum": 0.95, "weight_decay": 0.01}

_BUILT: list[Trainer] = []  # every trainer the running job built: their engines end with the job


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

    def curves(self) -> dict[str, list[float]]:
        return {
            "losses": [log["loss"] for log in self.logs],
            "grad_norms": [log["grad_norm"] for log in self.logs],
            "learning_rates": [log["learning_rate"] for log in self.logs],
        }


class SaveRecordingZeroTrainer(ZeroTrainer):
    """A ZeroTrainer that notes which tensors of each save were copies rather than the model's own."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.copied_for_save: list[str] = []

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if state_dict:
            own = {tensor.untyped_storage().data_ptr() for tensor in self.model.state_dict().values()}
            self.copied_for_save = sorted(
                name for name, tensor in state_dict.items() if tensor.untyped_storage().data_ptr() not in own
            )
        super()._save(output_dir, state_dict=state_dict)


def build_lora_model(seed: int = 0) -> torch.nn.Module:
    """The tiny GPT-2 with a LoRA adapter on its attention and MLP input projections (frozen base)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=LORA_TARGETS, fan_in_fan_out=True
    )  # GPT-2's Conv1D layers store their weights transposed: fan_in_fan_out
    return get_peft_model(build_model("gpt2", seed=seed), config)


def causal_lm_samples(count: int) -> dict[str, torch.Tensor]:
    """`count` training sequences followed by `EVAL_SAMPLES` held-out ones, all from one Markov chain."""
    tokens = markov_corpus(count + EVAL_SAMPLES, SEQ_LEN, VOCAB, seed=0)
    return {"input_ids": tokens, "labels": tokens.clone()}


def _datasets(steps: int) -> tuple[TensorDataset, TensorDataset]:
    count = GLOBAL_BATCH * ACCUMULATION * steps
    samples = causal_lm_samples(count)
    train = {key: value[:count] for key, value in samples.items()}
    held_out = {key: value[count:] for key, value in samples.items()}
    return TensorDataset(train), TensorDataset(held_out)


def _loss(model: torch.nn.Module, dataset: TensorDataset) -> float:
    """The model's mean loss over the whole of `dataset`, in one batch.

    The Trainer's own `eval_loss` is not comparable with a loss taken before training: with this
    config's default loss type it divides by every label, the first of each row included.
    """
    device = next(model.parameters()).device
    with torch.no_grad():
        return model(**{key: value.to(device) for key, value in dataset.columns.items()}).loss.item()


def _trainer(options, name: str, recorder: LogRecorder, **extra):
    world = int(os.environ.get("WORLD_SIZE", "1"))
    per_device = GLOBAL_BATCH if options.mode == "plain" else GLOBAL_BATCH // world
    args = TrainingArguments(
        output_dir=str(options.out / name),
        per_device_train_batch_size=per_device,
        per_device_eval_batch_size=per_device,
        gradient_accumulation_steps=ACCUMULATION,
        max_steps=options.steps,
        learning_rate=LEARNING_RATE["lora" if options.lora else "full"],
        warmup_steps=1,
        max_grad_norm=0.5,
        logging_steps=1,
        save_strategy="steps",
        save_steps=options.steps // 2,
        report_to=[],
        train_sampling_strategy="sequential",
        use_cpu=not torch.cuda.is_available(),
        bf16=options.precision == "bf16",
        disable_tqdm=True,
        seed=0,
        **extra,
    )
    kwargs = {}
    if options.muon and options.mode == "plain":  # AdamW as ZeroTrainer takes it from the arguments
        adamw = {"adamw_lr": args.learning_rate, "adamw_weight_decay": args.weight_decay}
        kwargs["optimizer_cls_and_kwargs"] = (MuonWithAdamW, {**MUON, **adamw})
    elif options.muon:
        kwargs["optimizer_cls_and_kwargs"] = (torch.optim.Muon, MUON)
    cls = Trainer
    if options.mode == "zero":
        cls = SaveRecordingZeroTrainer
        kwargs["zero_config"] = {"stage": options.stage, "reduce_bucket_size": 6000}
    train, held_out = _datasets(options.steps)
    trainer = cls(
        model=_model(options, args),
        args=args,
        train_dataset=train,
        eval_dataset=held_out,
        callbacks=[recorder],
        **kwargs,
    )
    _BUILT.append(trainer)
    return trainer


def _model(options, args: TrainingArguments) -> torch.nn.Module:
    if options.lora:
        return build_lora_model()
    if not options.from_pretrained:
        return build_model("gpt2")
    folder = options.out / "pretrained"
    with args.main_process_first(desc="saving the pretrained folder"):
        if not folder.exists():
            build_model("gpt2").save_pretrained(folder)
    return from_pretrained(AutoModelForCausalLM, folder, {"stage": options.stage})


def _resume(options, name: str, checkpoint: Path) -> dict:
    """Resume a fresh trainer from `checkpoint`, save its final model to OUT_DIR/name, return its curves."""
    recorder = LogRecorder()
    trainer = _trainer(options, name, recorder)
    trainer.train(resume_from_checkpoint=str(checkpoint))
    trainer.save_model(str(options.out / name))
    return recorder.curves()


def _resume_without_optimizer_state(options, checkpoint: Path) -> str:
    """The error a resume from a copy of `checkpoint` holding only weights and trainer state (as
    `save_only_model=True` writes) raises."""
    stripped = options.out / "weights_only_checkpoint"
    if int(os.environ.get("RANK", "0")) == 0:
        shutil.copytree(
            checkpoint, stripped, ignore=shutil.ignore_patterns("hf_zero_checkpoint", "scheduler.pt")
        )
        weights = options.out / "final" / "model.safetensors"  # (an adapter's checkpoint has its own)
        if weights.is_file():
            shutil.copy(weights, stripped / weights.name)
    torch.distributed.barrier()
    try:
        _trainer(options, "weights_only", LogRecorder()).train(resume_from_checkpoint=str(stripped))
    except FileNotFoundError as error:
        return str(error)
    return ""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m hf_zero.testing.trainer_run")
    parser.add_argument("mode", choices=["plain", "zero"])
    parser.add_argument("out", type=Path)
    parser.add_argument("--stage", type=int, default=2)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--lora", action="store_true")
    parser.add_argument("--muon", action="store_true")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument(
        "--resume-same",
        action="store_true",
        help="of --resume's checks, only the resume into OUT_DIR/resumed",
    )
    parser.add_argument("--from-plain", type=Path)
    parser.add_argument("--from-pretrained", action="store_true")
    parser.add_argument(
        "--resume-elsewhere", type=Path, help="a ZeroTrainer checkpoint of another run to resume"
    )
    return parser


def parse_job(argv: list[str]) -> argparse.Namespace:
    """One job's options from its command line (`plain OUT_DIR ...` or `zero OUT_DIR ...`, as in
    the module docstring); exits with a usage message for a command line that does not fit."""
    parser = _parser()
    options = parser.parse_args(argv)
    if options.mode == "plain" and (
        options.resume
        or options.resume_same
        or options.from_plain
        or options.from_pretrained
        or options.resume_elsewhere
    ):
        parser.error(
            "--resume, --from-plain and --from-pretrained are checks of ZeroTrainer runs (mode zero)"
        )
    return options


def run_job(options: argparse.Namespace) -> None:
    """Train, resume and save as `options` say, write OUT_DIR/report.json from rank 0, then close
    the engines of every trainer the job built. Every rank runs it."""
    _run_job(options)
    # Not after an error: closing a stage-3 engine destroys its group, which waits for collectives
    # the other ranks may never finish (see `hf_zero.engine.teardown`); the launch must fail instead.
    _close_built_trainers()


def _run_job(options: argparse.Namespace) -> None:
    recorder = LogRecorder()
    trainer = _trainer(options, "run", recorder)
    # A stage-3 model from from_pretrained runs only once sharded: measure the model it was saved from.
    initial_eval_loss = _loss(
        build_model("gpt2") if options.from_pretrained else trainer.model, trainer.eval_dataset
    )
    trainer.train()
    report = {
        **recorder.curves(),
        "initial_eval_loss": initial_eval_loss,
        "final_eval_loss": _loss(trainer.model, trainer.eval_dataset),
        "eval_loss": trainer.evaluate()["eval_loss"],
        "prediction_shape": list(trainer.predict(trainer.eval_dataset).predictions.shape),
        "global_step": trainer.state.global_step,
    }
    trainer.save_model(str(options.out / "final"))
    if options.mode == "zero":
        report["copied_for_save"] = trainer.copied_for_save
    halfway = options.out / "run" / f"checkpoint-{options.steps // 2}"
    if options.resume_same:
        report["resumed"] = _resume(options, "resumed", halfway)
    if options.resume:
        report["resumed"] = _resume(options, "resumed", halfway)
        other_stage = argparse.Namespace(**{**vars(options), "stage": 1 if options.stage == 3 else 3})
        report["resumed_at_other_stage"] = _resume(other_stage, "resumed_at_other_stage", halfway)
        report["weights_only_resume_error"] = _resume_without_optimizer_state(options, halfway)
        # The eval loss falls, so "greater is better" makes the first checkpoint the best one: the
        # model saved after training must be that checkpoint's, not the last step's.
        best = _trainer(
            options, "best", LogRecorder(), eval_strategy="steps", eval_steps=options.steps // 2,
            load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=True,
        )  # fmt: skip
        best.train()
        best.save_model(str(options.out / "best_final"))
    if options.from_plain:
        report["from_plain"] = _resume(options, "from_plain", options.from_plain)
    if options.resume_elsewhere:
        report["resumed_elsewhere"] = _resume(options, "resumed_elsewhere", options.resume_elsewhere)
    if trainer.is_world_process_zero():
        (options.out / "report.json").write_text(json.dumps(report))


def _close_built_trainers() -> None:
    """Close the engine of every trainer the job built (a trainer that never trained has none), in
    the order they were built, the same on every rank (closing a stage-3 engine destroys its
    gather group, which every rank must do at the same point); then free their memory."""
    trainers, _BUILT[:] = list(_BUILT), []
    for trainer in trainers:
        engine = getattr(trainer, "zero_engine", None)
        if engine is not None:
            engine.close()
    del trainers
    gc.collect()


class ProcessState:
    """What a job may change in its process beyond the objects it built, as it was when taken.

    A job seeds its own RNGs, but `restore` puts them back too, so that a job run after others
    sees the very states a freshly started process does, even in code that draws before seeding.
    """

    def __init__(self) -> None:
        self.environ = dict(os.environ)
        self.rng = (random.getstate(), np.random.get_state(), torch.get_rng_state())
        # A fresh process's CUDA generators start from this seed too, at offset 0; reading their
        # states here would start CUDA, so `restore` seeds them instead.
        self.initial_seed = torch.initial_seed()
        self.default_dtype = torch.get_default_dtype()
        self.deterministic = (
            torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled(),
        )
        self.threads = torch.get_num_threads()
        self.verbosity = transformers_logging.get_verbosity()

    def restore(self) -> None:
        """Put the process back as it was taken, and forget Accelerate's shared state (a Trainer's
        mixed precision is fixed in it, and Accelerate refuses to change it; TrainingArguments
        resets it too, but only once it sets up its device)."""
        for key in set(os.environ) - set(self.environ):
            del os.environ[key]
        os.environ.update(self.environ)
        python_rng, numpy_rng, torch_rng = self.rng
        random.setstate(python_rng)
        np.random.set_state(numpy_rng)
        torch.set_rng_state(torch_rng)
        if torch.cuda.is_available():
            torch.cuda.manual_seed_all(self.initial_seed)
        torch.set_default_dtype(self.default_dtype)
        mode, warn_only = self.deterministic
        torch.use_deterministic_algorithms(mode, warn_only=warn_only)
        torch.set_num_threads(self.threads)
        # The Trainer sets the verbosity from its log level: other ranks' "warning" by default.
        transformers_logging.set_verbosity(self.verbosity)
        # The default process group stays: later jobs of a launch run in it, as the Trainer finds it.
        AcceleratorState._reset_state(reset_partial_state=True)


def main(argv: list[str] | None = None) -> None:
    """Run the job `argv` (default: the command line) describes, or with `many JOBS.json` each job
    of the file in turn, in this process; then end it as a launched script ends."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["many"]:
        if len(argv) != 2:
            _parser().error("many takes one argument: a JSON file listing the jobs' command lines")
        command_lines = json.loads(Path(argv[1]).read_text())
    else:
        command_lines = [argv]
    jobs = [parse_job([str(arg) for arg in line]) for line in command_lines]  # all refused up front
    fresh = ProcessState()
    for index, (line, options) in enumerate(zip(command_lines, jobs, strict=True)):
        if len(jobs) > 1 and int(os.environ.get("RANK", "0")) == 0:
            # (A launch that fails shows its output: this says which job failed.)
            print(f"trainer_run: job {index + 1}/{len(jobs)}: {' '.join(map(str, line))}", flush=True)
        fresh.restore()
        run_job(options)
    exit_cleanly()


if __name__ == "__main__":
    main()
