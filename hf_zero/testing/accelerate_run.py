"""Train a tiny GPT-2 (tied embeddings) through `ZeroAccelerator` the way Accelerate users do; launch
with torchrun.

    torchrun --standalone --nproc_per_node 2 -m hf_zero.testing.accelerate_run OUT_DIR MODE [MODE ...]

The modes run one after another in the same processes (a launch's start-up alone costs about 15
CPU-seconds); each rank writes OUT_DIR/MODE/rank{r}.pt, a dict of results, as soon as the mode is
done, and the mode's saved folders go under OUT_DIR/MODE. Before each mode the process-wide state
one leaves behind is reset (Accelerate's shared state, dynamo's caches, the environment, the seed);
the process group the first Accelerator set up stays, as it would in a script. In the order
`tests/test_accelerator.py` runs them (mismatch, checkpoint, compile), each mode's results and
files equal those of the mode launched alone bit for bit, but for the Python and NumPy RNG states
that checkpoints record (nothing seeds them, so they differ from run to run anyway).

Modes:

- `checkpoint`: an fp32 stage-2 run that saves with automatic checkpoint naming (`total_limit=2`)
  after steps 1-3 and trains on to step 6; a second run, from other initial weights and another
  RNG state, loads the latest checkpoint and trains steps 4-6, then is refused a copy of that
  checkpoint that names another number of processes. Then a bf16 stage-1 run: its
  `get_state_dict`, `save_model` and `save_pretrained` folders, and a `save_state`/`load_state`
  round trip in place.
- `compile`: `ZeroTrainer` with `TrainingArguments(torch_compile=True)` (the whole model) and a
  `ZeroAccelerator` loop compiled region by region, both with the `aot_eager` backend, each
  against the same run with compilation switched off.
- `mismatch`: a `ZeroAccelerator` built without `cpu=True` on a machine without GPUs (launch with
  CUDA_VISIBLE_DEVICES="" to hide a machine's GPUs; the other modes pass `cpu=True` anyway).

Batches are drawn from a Markov-chain corpus with the global RNG (seeded alike on every rank), so
a resumed run only sees the same data if the RNG state was restored.
"""

from __future__ import annotations

import gc
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import ProjectConfiguration, has_compiled_regions, is_compiled_module
from torch._dynamo.utils import counters
from transformers import TrainingArguments

from ..cli.data import causal_lm_dataset, markov_corpus
from ..integrations.accelerator import ZeroAccelerator
from ..integrations.trainer import ZeroTrainer
from .cases import BUCKET_SIZE, build_optimizer
from .launch import exit_cleanly
from .tiny_models import SEQ_LEN, VOCAB, build_model

TOKENS = markov_corpus(512, SEQ_LEN, VOCAB)
MICRO_BATCH = 2
ACCUMULATION = 2
STEPS = 6
SAVE_AFTER = (1, 2, 3)  # steps after which the first run saves; total_limit=2 keeps the last two


class Progress:
    """A custom object registered for checkpointing: samples seen so far."""

    def __init__(self) -> None:
        self.samples = 0

    def state_dict(self) -> dict:
        return {"samples": self.samples}

    def load_state_dict(self, state: dict) -> None:
        self.samples = state["samples"]


class Run:
    """A model, two-group AdamW and LR scheduler prepared by `accelerator`, trained with accumulation."""

    def __init__(self, accelerator: ZeroAccelerator, seed: int) -> None:
        self.accelerator = accelerator
        model = build_model("gpt2", seed=seed)
        optimizer = build_optimizer("adamw", list(model.named_parameters()), model)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1.0 + 0.1 * step))
        self.model, self.optimizer, self.scheduler = accelerator.prepare(model, optimizer, scheduler)
        self.engine = accelerator.zero_engine
        self.progress = Progress()
        accelerator.register_for_checkpointing(self.progress)

    def train_step(self) -> float:
        """One optimizer step of ACCUMULATION micro-batches; returns the global mean loss."""
        accelerator, rank = self.accelerator, dist.get_rank()
        total = torch.zeros(())
        for _ in range(ACCUMULATION):
            rows = torch.randint(0, len(TOKENS), (dist.get_world_size() * MICRO_BATCH,))
            batch = TOKENS[rows[rank * MICRO_BATCH : (rank + 1) * MICRO_BATCH]]
            with accelerator.accumulate(self.model):
                loss = self.model(input_ids=batch, labels=batch).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(self.model.parameters(), 1.0)
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad()
            total += loss.detach()
            self.progress.samples += len(rows)
        return accelerator.reduce(total, "mean").item() / ACCUMULATION

    def weights(self) -> dict[str, torch.Tensor]:
        return self.engine.full_state_dict()


def _accelerator(
    project: Path, stage: int, precision: str = "fp32", automatic: bool = True
) -> ZeroAccelerator:
    config = {"stage": stage, "precision": precision, "reduce_bucket_size": BUCKET_SIZE}
    return ZeroAccelerator(
        zero_config=config,
        cpu=True,
        gradient_accumulation_steps=ACCUMULATION,
        project_config=ProjectConfiguration(
            project_dir=str(project), automatic_checkpoint_naming=automatic, total_limit=2
        ),
    )


def _resume(out: Path) -> dict:
    """An uninterrupted fp32 run against one resumed from its latest automatic checkpoint."""
    accelerator = _accelerator(out / "project", stage=2)
    first = Run(accelerator, seed=0)
    losses, lrs = [], []
    for step in range(1, STEPS + 1):
        losses.append(first.train_step())
        lrs.append(first.scheduler.get_last_lr())
        if step in SAVE_AFTER:
            accelerator.save_state()
            if step == SAVE_AFTER[-1]:
                saved = {
                    "weights": first.weights(),
                    "step": accelerator.step,
                    "samples": first.progress.samples,
                }

    resumed_accelerator = _accelerator(out / "project", stage=2)
    second = Run(resumed_accelerator, seed=1)  # other initial weights, which loading must replace
    torch.manual_seed(1234)  # another RNG state, which loading must replace
    resumed_accelerator.load_state()
    restored = {"step": resumed_accelerator.step, "samples": second.progress.samples}
    resumed_losses, resumed_lrs = [], []
    for _ in range(STEPS - SAVE_AFTER[-1]):
        resumed_losses.append(second.train_step())
        resumed_lrs.append(second.scheduler.get_last_lr())
    stage3_losses, stage3_weights = _resumed_at_stage3(out)
    return {
        "losses": losses,
        "lrs": lrs,
        "weights": first.weights(),
        "saved": saved,
        "restored": restored,
        "resumed_losses": resumed_losses,
        "resumed_lrs": resumed_lrs,
        "resumed_weights": second.weights(),
        "stage3_losses": stage3_losses,
        "stage3_weights": stage3_weights,
    }


def _resumed_at_stage3(out: Path) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Load the latest checkpoint (saved at stage 2) into a stage-3 run and finish the run."""
    accelerator = _accelerator(out / "project", stage=3)
    run = Run(accelerator, seed=1)
    accelerator.load_state()
    losses = [run.train_step() for _ in range(STEPS - SAVE_AFTER[-1])]
    return losses, run.weights()


def _bf16_weights_api(out: Path) -> dict:
    """bf16 stage 1: full fp32 weights through get_state_dict/save_model, and an in-place reload."""
    accelerator = _accelerator(out / "bf16_project", stage=1, precision="bf16", automatic=False)
    run = Run(accelerator, seed=2)
    for _ in range(2):
        run.train_step()
    masters = run.weights()
    state = accelerator.get_state_dict(run.model)
    accelerator.save_model(run.model, out / "save_model")
    unwrapped = accelerator.unwrap_model(run.model)
    if accelerator.is_main_process:
        unwrapped.config.save_pretrained(out / "save_model")  # save_model writes weights only
    unwrapped.save_pretrained(
        out / "save_pretrained",
        is_main_process=accelerator.is_main_process,
        state_dict=accelerator.get_state_dict(run.model),
    )

    accelerator.save_state(str(out / "bf16_checkpoint"), safe_serialization=False)
    after_save = [run.train_step() for _ in range(2)]
    weights_after_save = run.weights()
    accelerator.load_state(str(out / "bf16_checkpoint"))
    after_load = [run.train_step() for _ in range(2)]
    accelerator.wait_for_everyone()
    return {
        "masters": masters,
        "state_dict": state,
        "model_dtype": str(next(run.model.parameters()).dtype),
        "unwrap_is_model": unwrapped is run.model,
        "after_save": after_save,
        "after_load": after_load,
        "weights_after_save": weights_after_save,
        "weights_after_load": run.weights(),
    }


def _checkpoint(out: Path) -> dict:
    return {"resume": _resume(out), "bf16": _bf16_weights_api(out)}


def _compiled_and_eager(train, name: str) -> dict:
    """`train()` compiled, then with compilation switched off: how the model it trained was
    compiled, the graphs dynamo compiled, and both runs' final weights."""
    counters.clear()
    model, compiled_weights = train()
    graphs = counters["stats"]["unique_graphs"]
    with torch.compiler.set_stance("force_eager"):
        _, eager_weights = train()
    return {
        f"{name}_compiled_as": _compiled_as(model),
        f"{name}_graphs": graphs,
        f"{name}_compiled_weights": compiled_weights,
        f"{name}_eager_weights": eager_weights,
    }


def _compiled_as(model: torch.nn.Module) -> str | None:
    if is_compiled_module(model):
        return "whole"
    return "regions" if has_compiled_regions(model) else None


def _train_trainer(out: Path):
    args = TrainingArguments(
        output_dir=str(out / "trainer"),
        per_device_train_batch_size=MICRO_BATCH,
        max_steps=3,
        learning_rate=2e-3,
        report_to=[],
        use_cpu=True,
        torch_compile=True,
        torch_compile_backend="aot_eager",
        save_strategy="no",
        train_sampling_strategy="sequential",
        disable_tqdm=True,
        seed=0,
    )
    trainer = ZeroTrainer(
        model=build_model("gpt2"),
        args=args,
        train_dataset=causal_lm_dataset(TOKENS[:64]),
        zero_config={"stage": 2, "reduce_bucket_size": BUCKET_SIZE},
    )
    trainer.train()
    return trainer.model_wrapped, trainer.zero_engine.full_state_dict()


def _train_accelerate():
    # The Trainer above set up Accelerate's process-wide state, dynamo plugin included, with the
    # same backend; the plugin is switched to compiling the repeated blocks (GPT2Block) one by one.
    accelerator = ZeroAccelerator(
        zero_config={"stage": 2, "reduce_bucket_size": BUCKET_SIZE}, cpu=True, dynamo_backend="aot_eager"
    )
    accelerator.state.dynamo_plugin.use_regional_compilation = True
    model = build_model("gpt2")
    optimizer = build_optimizer("adamw", list(model.named_parameters()), model)
    model, optimizer = accelerator.prepare(model, optimizer)
    rank = dist.get_rank()
    for step in range(3):
        start = (step * dist.get_world_size() + rank) * MICRO_BATCH
        batch = TOKENS[start : start + MICRO_BATCH]
        accelerator.backward(model(input_ids=batch, labels=batch).loss)
        optimizer.step()
        optimizer.zero_grad()
    return model, accelerator.get_state_dict(model)


def _compile(out: Path) -> dict:
    results = _compiled_and_eager(lambda: _train_trainer(out), "trainer")
    results.update(_compiled_and_eager(_train_accelerate, "regional"))
    return results


def _mismatch(out: Path) -> dict:
    try:
        ZeroAccelerator(zero_config={"stage": 2})
    except RuntimeError as error:
        return {"error": str(error)}
    return {"error": None}


MODES = {"checkpoint": _checkpoint, "compile": _compile, "mismatch": _mismatch}


def _fresh_process_state(environ: dict[str, str]) -> None:
    """Undo what an earlier mode left in this process that the next one would see: the environment
    (TrainingArguments sets ACCELERATE_DYNAMO_*), Accelerate's shared state (a new Accelerator then
    sets it up again from its own arguments and joins the process group that is already there),
    dynamo's compiled code, and the global seed."""
    os.environ.clear()
    os.environ.update(environ)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    torch._dynamo.reset()
    gc.collect()  # the last mode's engines (and any threads they own) end here, not inside the next
    torch.manual_seed(0)


def main(argv: list[str]) -> None:
    out, modes = Path(argv[0]), argv[1:]
    unknown = [mode for mode in modes if mode not in MODES]
    if unknown or not modes:
        raise SystemExit(f"usage: OUT_DIR MODE [MODE ...], modes from {list(MODES)}; got {modes}")
    torch.set_num_threads(1)
    environ = dict(os.environ)
    for mode in modes:
        _fresh_process_state(environ)
        (out / mode).mkdir(parents=True, exist_ok=True)
        results = MODES[mode](out / mode)
        torch.save(results, out / mode / f"rank{os.environ['RANK']}.pt")
    exit_cleanly()


if __name__ == "__main__":
    main(sys.argv[1:])
