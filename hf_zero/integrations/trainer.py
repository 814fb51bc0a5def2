"""`ZeroTrainer`: `transformers.Trainer` with hf_zero's ZeRO engine doing the sharding.

It swaps in a `ZeroAccelerator`, so the Trainer's own seams (`accelerator.prepare`,
`accelerator.backward`, `accelerator.clip_grad_norm_`, `optimizer.step()`) drive the engine;
nothing in transformers is patched. `save_model` writes the full fp32 weights into a normal
`save_pretrained` folder unit by unit (the writing rank holds one unit and one output file's worth
on the host at a time), or for a PEFT model only the trainable adapter weights into an adapter
folder.

A Trainer checkpoint (`checkpoint-N/`) keeps the Trainer's own files (`trainer_state.json`, the LR
schedule, RNG states, training arguments, config and tokenizer) and puts the model's training
state in an hf_zero checkpoint, `checkpoint-N/hf_zero_checkpoint/` (see `hf_zero.checkpoint`):
per-rank safetensors and a manifest, written atomically. It resumes on any number of processes
and at any stage, serves `load_best_model_at_end`, and `hf-zero merge` turns it into a
`from_pretrained` folder. With `save_only_model=True` a checkpoint holds the full weights instead.
A checkpoint of the plain Trainer resumes too: its weights load through the engine and its
`optimizer.pt` is cut into per-rank shards. `train(resume_from_checkpoint="auto")` resumes from the
newest complete checkpoint in the output folder, or starts afresh when there is none: the switch
for a script that a launcher restarts after a failure (`torchrun --max-restarts`).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import os
from typing import Any

import torch
from transformers import PretrainedConfig, Trainer
from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME, TRAINING_ARGS_NAME
from transformers.trainer_utils import rotate_checkpoints

from ..checkpoint.format import TRAINER_SUBFOLDER, is_checkpoint
from ..config.deepspeed import training_args_mismatches
from ..config.zero_config import ZeroConfig
from ..core.chained_optimizer import as_one_optimizer
from ..core.params import is_peft_model
from ..engine.optim_state import load_unsharded_optimizer_state
from ..engine.segments import check_available
from ..engine.zero_engine import ZeroEngine, engine_of
from ..hub.model_card import facts_from_trainer, write_card
from ..hub.pending import PendingWeights
from ..hub.saving import save_full_weights
from ..hub.weights import load_pretrained_weights
from .accelerator import ZeroAccelerator
from .muon import muon_with_adamw
from .resume import AUTO, describe_checkpoint, newest_complete_checkpoint


class ZeroTrainer(Trainer):
    """A `transformers.Trainer` that trains with ZeRO stages 0-3 (see `ZeroConfig`).

    Args:
        zero_config: a `ZeroConfig`, a dict of its fields, or a path to a YAML/JSON file. Training
            loop settings come from `TrainingArguments` (`bf16`/`fp16`, `max_grad_norm`,
            `gradient_accumulation_steps`); the config may repeat them but not contradict them.
        *args, **kwargs: as for `transformers.Trainer`. Launch several ranks with torchrun.
    """

    def __init__(self, *args: Any, zero_config: ZeroConfig | dict | str | None = None, **kwargs: Any) -> None:
        # Set before super().__init__, which builds the accelerator.
        self.zero_config = ZeroConfig.coerce(zero_config)
        optimizers = kwargs.get("optimizers")
        if optimizers and isinstance(optimizers[0], (list, tuple)):  # ([muon, adamw], scheduler)
            kwargs["optimizers"] = (as_one_optimizer(optimizers[0]), *optimizers[1:])
        super().__init__(*args, **kwargs)

    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        """The Trainer's optimizer; with `optimizer_cls_and_kwargs=(torch.optim.Muon, settings)`, Muon
        with those settings for the hidden matrices and AdamW for the rest (`hf_zero.MuonWithAdamW`),
        AdamW with the TrainingArguments' learning rate, betas, epsilon and weight decay."""
        muon = getattr(torch.optim, "Muon", None)
        if (
            self.optimizer is None
            and self.optimizer_cls_and_kwargs
            and self.optimizer_cls_and_kwargs[0] is muon
        ):
            args = self.args
            adamw = {
                "adamw_lr": args.learning_rate,
                "adamw_betas": (args.adam_beta1, args.adam_beta2),
                "adamw_eps": args.adam_epsilon,
                "adamw_weight_decay": args.weight_decay,
            }
            settings = {**adamw, **self.optimizer_cls_and_kwargs[1]}
            self.optimizer = muon_with_adamw(self.model if model is None else model, **settings)
            return self.optimizer
        return super().create_optimizer(model)

    # ---- accelerator -----------------------------------------------------------------------------

    def _build_accelerator_args(self, **kwargs: Any) -> dict[str, Any]:
        args = super()._build_accelerator_args(**kwargs)
        self._zero_accelerator_args = dict(args)
        # The plain Accelerator the base class builds first must not switch on autocast either.
        args["mixed_precision"] = "no"
        return args

    def create_accelerator_and_postprocess(self) -> None:
        if self.args.deepspeed or self.args.fsdp:
            raise ValueError(
                "ZeroTrainer does the sharding itself: remove `deepspeed`/`fsdp` from TrainingArguments "
                "(a DeepSpeed config converts with ZeroConfig.from_deepspeed(path))"
            )
        self.zero_config = self._agree_with_training_args(self.zero_config)
        super().create_accelerator_and_postprocess()
        self.accelerator = ZeroAccelerator(zero_config=self.zero_config, **self._zero_accelerator_args)
        self.zero_config = self.accelerator.zero_config
        # The precision is known now (TrainingArguments' bf16/fp16 filled "auto"): refuse what cannot
        # run here when the Trainer is built, not when train() starts.
        check_available(self.zero_config)
        self.gather_function = self.accelerator.gather_for_metrics
        if "use_gather_object" in inspect.signature(self.gather_function).parameters:
            self.gather_function = functools.partial(
                self.gather_function, use_gather_object=self.args.eval_use_gather_object
            )

    def _agree_with_training_args(self, config: ZeroConfig) -> ZeroConfig:
        """The Trainer's arguments own the loop; a config that repeats them must say the same."""
        args = self.args
        if config.gradient_clipping > 0 and config.gradient_clipping != args.max_grad_norm:
            raise ValueError(
                f"ZeroConfig.gradient_clipping={config.gradient_clipping} disagrees with "
                f"TrainingArguments.max_grad_norm={args.max_grad_norm}; the Trainer clips, so set "
                "max_grad_norm and leave gradient_clipping at 0"
            )
        steps = config.gradient_accumulation_steps
        if steps != 1 and steps != args.gradient_accumulation_steps:
            raise ValueError(
                f"ZeroConfig.gradient_accumulation_steps={steps} disagrees with "
                f"TrainingArguments.gradient_accumulation_steps={args.gradient_accumulation_steps}; set it "
                "in TrainingArguments"
            )
        mismatches = training_args_mismatches(config.deepspeed_loop_values, args)
        if mismatches:
            raise ValueError(
                "the DeepSpeed config's training values disagree with TrainingArguments, which ZeroTrainer "
                "trains with:\n" + "\n".join(mismatches) + '\nset them in TrainingArguments and write "auto" '
                "in the DeepSpeed config (or make them equal), as with the Trainer's deepspeed= argument"
            )
        return config

    def _move_model_to_device(self, model: torch.nn.Module, device: torch.device) -> None:
        """A model from `hf_zero.from_pretrained` at stage 3 still has its weights on disk: the engine
        places it when it shards it, reading each rank's part."""
        if PendingWeights.of(model) is None:
            super()._move_model_to_device(model, device)

    @property
    def zero_engine(self) -> ZeroEngine | None:
        """The engine sharding the model (None before training starts)."""
        return engine_of(self.model)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Training logs under fp16 also report the loss scale and how many steps were skipped for
        overflowing gradients so far (the LR schedule does not advance on those)."""
        engine = self.zero_engine
        if engine is not None and engine.loss_scaler is not None and "loss" in logs:
            logs = {**logs, "loss_scale": engine.loss_scale, "skipped_steps": engine.skipped_steps}
        super().log(logs, *args, **kwargs)

    # ---- saving ------------------------------------------------------------------------------------

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        """`Trainer.train`, and `resume_from_checkpoint="auto"`: resume from the newest complete
        checkpoint in `args.output_dir` (one whose save was interrupted is passed over), or start
        afresh when there is none. The main process says which, in one line. With
        `ZeroConfig.async_checkpoints` it returns once the last checkpoint is complete."""
        if resume_from_checkpoint == AUTO:
            resume_from_checkpoint = newest_complete_checkpoint(self.args.output_dir)
        if isinstance(resume_from_checkpoint, str) and self.args.process_index == 0:
            print(f"hf_zero: resumed from {describe_checkpoint(resume_from_checkpoint)}", flush=True)
        try:
            result = super().train(resume_from_checkpoint, *args, **kwargs)
        except BaseException:
            # The checkpoint in flight still completes, but the training error is the one to see.
            with contextlib.suppress(Exception):
                self._finish_checkpoint()
            raise
        self._finish_checkpoint()
        return result

    def _finalize_training(self, *args: Any, **kwargs: Any) -> Any:
        # The Trainer may now load the best checkpoint or delete all but it: the last one must be whole.
        self._finish_checkpoint()
        return super()._finalize_training(*args, **kwargs)

    def _save_checkpoint(self, model: torch.nn.Module, trial: Any) -> None:
        # While a checkpoint is written, its weights go into the hf_zero checkpoint (see
        # `_save_optimizer_and_scheduler`), so `save_model` need not gather them too.
        engine = self.zero_engine
        self._finish_checkpoint()
        self._writing_checkpoint = engine is not None and not self.args.save_only_model
        # An asynchronous checkpoint is still being written when the Trainer would delete older ones
        # (`save_total_limit`): they are deleted once it is complete, so one always is.
        deferred = self._writing_checkpoint and engine.config.async_checkpoints
        limit = self.args.save_total_limit
        if deferred:
            self.args.save_total_limit = None
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._writing_checkpoint = False
            self.args.save_total_limit = limit
        if deferred:
            self._rotation_due = self._get_output_dir(trial=trial)

    def _finish_checkpoint(self) -> None:
        """Wait for the engine's asynchronous checkpoint in flight, then delete the checkpoints that
        `save_total_limit` let go while it was written."""
        engine = self.zero_engine
        if engine is None:
            return
        engine.wait_for_checkpoint()
        run_dir, self._rotation_due = getattr(self, "_rotation_due", None), None
        if run_dir is not None and self.args.should_save:
            rotate_checkpoints(
                output_dir=run_dir,
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=True,
            )

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Write a normal `save_pretrained` folder with the full fp32 master weights, gathered and
        written one unit at a time (see `hf_zero.hub.saving`).

        For a PEFT model the folder is PEFT's adapter folder (`PeftModel.from_pretrained` loads
        it) holding the fp32 masters of the trainable weights; the frozen base is neither gathered
        nor copied. Every rank must call it (the weights are all-gathered); only the writing
        rank(s) hold them on the host.
        """
        engine = self.zero_engine
        if engine is None:
            super().save_model(output_dir, _internal_call=_internal_call)
            return
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        had_card = os.path.exists(os.path.join(output_dir, "README.md"))
        with engine.watch.engine_call("save_model"):
            if is_peft_model(self.model):
                self._save(output_dir, state_dict=self._adapter_state_dict(engine))
            else:
                self._save_full_weights(
                    engine, output_dir, weights=not getattr(self, "_writing_checkpoint", False)
                )
        if self.args.should_save and not _internal_call:
            # The Trainer's own card is written only when pushing to the Hub; this one is always there.
            # A card this save wrote (PEFT writes a placeholder one) gives way to the filled one.
            write_card(output_dir, facts_from_trainer(self, output_dir), replace=not had_card)
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def _save_full_weights(self, engine: ZeroEngine, output_dir: str, weights: bool = True) -> None:
        """What `Trainer._save` writes, with the weights streamed unit by unit (left out with
        `weights=False`: a checkpoint keeps them in its hf_zero checkpoint)."""
        if weights:
            save_full_weights(engine, output_dir, keep=self.args.should_save)
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        if isinstance(getattr(model, "config", None), PretrainedConfig):
            model.config.save_pretrained(output_dir)
            if getattr(model, "generation_config", None) is not None and model.can_generate():
                model.generation_config.save_pretrained(output_dir)
            saved_dtype = next((g.original_dtypes[0] for g in engine.groups if g.params), None)
            if saved_dtype is not None and weights:
                _record_saved_dtype(output_dir, saved_dtype)
        tokenizer = self.processing_class or getattr(self.data_collator, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.save_pretrained(output_dir)
        _atomic_torch_save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _adapter_state_dict(self, engine: ZeroEngine) -> dict[str, torch.Tensor]:
        """What a PEFT save picks its tensors from: the gathered fp32 masters of the trainable
        weights, and the model's own (uncopied) tensors for everything else.

        PEFT keeps the adapter's weights and, when it decides to (embedding layers targeted or
        resized), some frozen ones; handing it references to the frozen tensors lets it take
        those without anything copying the whole base model first.
        """
        trained = engine.full_state_dict(keep=self.args.should_save, trainable_only=True)
        if not self.args.should_save:
            return {}
        return {**self.model.state_dict(), **trained}

    def _load_from_checkpoint(
        self, resume_from_checkpoint: str, model: torch.nn.Module | None = None
    ) -> None:
        """The weights of an hf_zero checkpoint load with its optimizer state, once the engine exists
        (`_load_optimizer_and_scheduler`); so does nothing here for one.

        Other checkpoints (the plain Trainer's, `save_only_model` ones) load as the Trainer loads
        them; once the model is sharded, full weights go through the engine so the fp32 masters
        follow, and adapters through PEFT's `load_adapter`, whose `model.load_state_dict` the
        engine extends to the masters.
        """
        if _engine_checkpoint(resume_from_checkpoint) is not None:
            return
        engine = self.zero_engine
        if engine is None or is_peft_model(self.model):
            super()._load_from_checkpoint(resume_from_checkpoint, model)
            return
        engine.load_full_state_dict(load_pretrained_weights(resume_from_checkpoint))

    def _load_best_model(self) -> None:
        """The best checkpoint's fp32 masters (and its optimizer state) from its hf_zero checkpoint."""
        engine = self.zero_engine
        best = self.state.best_model_checkpoint
        state = _engine_checkpoint(best)
        if engine is not None and state is not None:
            engine.load_checkpoint(state, restore_rng=False)
        elif engine is None or is_peft_model(self.model):
            super()._load_best_model()
        else:
            engine.load_full_state_dict(load_pretrained_weights(best))

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        """The engine's checkpoint (masters, optimizer state, frozen weights but a PEFT model's base,
        buffers) into `hf_zero_checkpoint/`; the writing rank also writes the LR schedule.

        Every rank calls this (the Trainer does), and the engine's save returns on every rank only
        once its checkpoint is complete: right after, the writing rank records the checkpoint and
        may delete older ones. An asynchronous save returns at once; older checkpoints are then
        deleted once it is complete (`_finish_checkpoint`).
        """
        engine = self.zero_engine
        if engine is None:
            super()._save_optimizer_and_scheduler(output_dir)
            return
        engine.save_checkpoint(
            os.path.join(output_dir, TRAINER_SUBFOLDER), include_frozen=not is_peft_model(self.model)
        )
        if self.args.should_save:
            _atomic_torch_save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))
        engine.comm.barrier()

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        """Resume the model and optimizer from the hf_zero checkpoint (saved on any number of
        processes, at any stage) or, for a checkpoint the plain Trainer wrote, the optimizer from its
        unsharded `optimizer.pt`; then the LR schedule. (The Trainer restores the RNG states.)

        A checkpoint with neither is refused rather than silently resumed with a fresh optimizer
        and a restarted schedule. Every rank sees the same files, so all ranks decide alike.
        """
        engine = self.zero_engine
        if checkpoint is None or engine is None:
            super()._load_optimizer_and_scheduler(checkpoint)
            return
        _load_optimizer_state(checkpoint, engine)
        scheduler = os.path.join(checkpoint, SCHEDULER_NAME)
        if not os.path.isfile(scheduler):
            raise FileNotFoundError(
                f"checkpoint {checkpoint} has optimizer state but no {SCHEDULER_NAME}, so the learning-rate "
                "schedule cannot resume: the checkpoint was not completely written; resume from an earlier one"
            )
        self.lr_scheduler.load_state_dict(torch.load(scheduler, weights_only=True))


def _engine_checkpoint(folder: str | None) -> str | None:
    """The hf_zero checkpoint inside a Trainer checkpoint folder, if it has one."""
    if folder is None:
        return None
    path = os.path.join(folder, TRAINER_SUBFOLDER)
    return path if is_checkpoint(path) else None


def _load_optimizer_state(checkpoint: str, engine: ZeroEngine) -> None:
    """Load the engine's state from the checkpoint's hf_zero checkpoint or the plain Trainer's
    `optimizer.pt`; refuse, naming what is missing, a checkpoint with neither."""
    state = _engine_checkpoint(checkpoint)
    if state is not None:
        engine.load_checkpoint(state, restore_rng=False)
        return
    partial = [name for name in os.listdir(checkpoint) if name.startswith(f".{TRAINER_SUBFOLDER}.partial")]
    if partial:
        raise FileNotFoundError(
            f"checkpoint {checkpoint} holds only an unfinished {TRAINER_SUBFOLDER} ({partial[0]}): its save was "
            "interrupted; resume from an earlier checkpoint"
        )
    unsharded = os.path.join(checkpoint, OPTIMIZER_NAME)
    if os.path.isfile(unsharded):
        # Memory-mapped: every rank reads only the slices it keeps, not its own copy of all the state.
        state = torch.load(unsharded, map_location="cpu", weights_only=True, mmap=True)
        load_unsharded_optimizer_state(engine, state)
        return
    raise FileNotFoundError(
        f"checkpoint {checkpoint} holds no optimizer state: neither an hf_zero checkpoint "
        f"({TRAINER_SUBFOLDER}/) nor the plain Trainer's {OPTIMIZER_NAME} (a checkpoint written with "
        "save_only_model=True keeps only the weights). Resuming from it would silently restart the "
        "optimizer and the learning-rate schedule. To start a new run from its weights, load them with "
        f"from_pretrained({checkpoint!r}) (PeftModel.from_pretrained for an adapter) and call train() "
        "without resume_from_checkpoint."
    )


def _record_saved_dtype(output_dir: str, saved: torch.dtype) -> None:
    """Make `config.json` name the dtype the weights were saved in.

    `save_pretrained` records the dtype the model computes in (bf16 under bf16 training), but the
    folder holds the fp32 masters, and `from_pretrained` would load them back in bf16 by default.
    """
    path = os.path.join(output_dir, "config.json")
    if not os.path.isfile(path):
        return
    with open(path) as file:
        config = json.load(file)
    config["dtype"] = str(saved).removeprefix("torch.")
    partial = f"{path}.partial"
    with open(partial, "w") as file:
        json.dump(config, file, indent=2, sort_keys=True)
        file.write("\n")
    os.replace(partial, path)


def _atomic_torch_save(obj: Any, path: str) -> None:
    """Write `path` completely or not at all."""
    partial = f"{path}.partial"
    torch.save(obj, partial)
    os.replace(partial, path)
