"""`ZeroAccelerator`: an `accelerate.Accelerator` that shards with hf_zero instead of wrapping in DDP.

`prepare(model, optimizer, ...)` hands the model and its optimizer to the ZeRO engine (the model
comes back as itself, its parameters now views into flat buffers, compiled if Accelerate's dynamo
plugin asks for it; the optimizer as an `AcceleratedOptimizer` around the engine's shard optimizer)
and prepares data loaders and schedulers as Accelerate always does. The engine computes on
`accelerator.device` (see `placement.py`): as under plain Accelerate, a model on the CPU is moved
there, unless `device_placement=False`; stage-3 weights still on disk are read straight onto it.
`backward`, `clip_grad_norm_` and `no_sync` go through the engine. Precision is the engine's
business, so Accelerate's autocast and GradScaler stay off.

Checkpoints: `save_state`/`load_state` keep everything Accelerate saves (schedulers, data loader
samplers, RNG states, objects registered for checkpointing, `step`, automatic naming and
`total_limit` rotation) except the sharded model and its optimizer, which go into an hf_zero
checkpoint in the `hf_zero_checkpoint/` subfolder (see `hf_zero.checkpoint`: per-rank fp32
masters and optimizer state as safetensors plus a manifest, written atomically, loadable on any
number of processes and at any stage). Accelerate's own writer would keep one view per flat buffer
(safetensors drops tensors that share storage) and only rank 0's optimizer shard.
`get_state_dict` and `save_model` give the full fp32 weights.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.optimizer import AcceleratedOptimizer
from accelerate.utils import DynamoBackend, compile_regions

from ..checkpoint.format import TRAINER_SUBFOLDER
from ..config.zero_config import ZeroConfig
from ..core.params import is_peft_model
from ..engine.segments import check_available
from ..engine.zero_engine import ZeroEngine, engine_of
from ..hub.pending import PendingWeights
from ..hub.saving import save_full_weights, write_atomically
from .placement import decide_placement

_ACCELERATE_TO_ZERO_PRECISION = {"no": "fp32", "bf16": "bf16", "fp16": "fp16"}


def resolve_precision(config: ZeroConfig, requested: str | None) -> ZeroConfig:
    """Fill precision "auto" from the precision the launcher or Trainer asked for, or refuse a clash."""
    requested = _ACCELERATE_TO_ZERO_PRECISION.get(str(requested or "no"))
    if requested is None:
        raise ValueError(
            "hf_zero supports mixed precision 'no', 'bf16' and 'fp16' (fp8 is not supported); "
            "set it with ZeroConfig.precision"
        )
    if config.precision == "auto":
        return config.replace(precision=requested)
    if requested != "fp32" and requested != config.precision:
        raise ValueError(
            f"ZeroConfig.precision={config.precision!r} clashes with the requested mixed precision "
            f"{requested!r}; set one of them only (or make them agree)"
        )
    return config


class ZeroAccelerator(Accelerator):
    """An Accelerator whose `prepare` shards the model and optimizer with hf_zero.

    Args:
        zero_config: a `ZeroConfig`, a dict of its fields, or a path to a YAML/JSON file. A config that
            cannot run here (e.g. an NVMe offload folder that does not exist) is refused here.
        *args, **kwargs: passed to `accelerate.Accelerator`. `mixed_precision` (or the launcher's
            setting) fills `ZeroConfig.precision` when that is "auto". On a machine without GPUs,
            pass `cpu=True` when launching several processes.

    Raises:
        RuntimeError: when Accelerate counts a different number of processes than the launcher
            started (each process would otherwise train alone on the same data).
        ValueError: from `prepare`, for a model that cannot train on `accelerator.device` (on
            another GPU, or kept off it by `device_placement=False`; see `placement.py`).
    """

    def __init__(self, *args: Any, zero_config: ZeroConfig | dict | str | None = None, **kwargs: Any) -> None:
        requested = kwargs.get("mixed_precision") or os.environ.get("ACCELERATE_MIXED_PRECISION")
        config = resolve_precision(ZeroConfig.coerce(zero_config), requested)
        check_available(config)  # refuse what cannot run here now, not at the first prepare or step
        self.zero_config = config
        kwargs["mixed_precision"] = "no"
        super().__init__(*args, **kwargs)
        # Whether the CPU was asked for: the Trainer (use_cpu) and `accelerate launch --cpu` tell
        # Accelerate's shared state rather than pass cpu=True here.
        self._cpu_requested = bool(kwargs.get("cpu") or getattr(self.state, "_cpu", False))
        self.zero_engine: ZeroEngine | None = None
        self._check_world_agrees()

    def _check_world_agrees(self) -> None:
        """Refuse to run when Accelerate's world differs from the launcher's.

        torchrun on a machine without GPUs and without `cpu=True` gives processes that Accelerate
        takes for single-process runs while torch.distributed holds them all in one group.
        """
        launched = _launched_world_size()
        if launched != self.num_processes:
            raise RuntimeError(
                f"Accelerate counts {self.num_processes} process(es) but the launcher started {launched} "
                "(torch.distributed world size, or WORLD_SIZE): each process would train alone on the same "
                "data and write the same files. On a machine without GPUs pass cpu=True to ZeroAccelerator "
                "(use_cpu=True in TrainingArguments, `accelerate launch --cpu`); otherwise launch as many "
                "processes as Accelerate uses (one per GPU)."
            )

    # ---- preparation -----------------------------------------------------------------------------

    def prepare(self, *args: Any, device_placement: list[bool] | None = None) -> Any:
        """Shard the (one) model with its (one) optimizer on `accelerator.device`, then prepare
        everything as Accelerate does (`device_placement`, per object, as in `Accelerator.prepare`)."""
        models = [obj for obj in args if isinstance(obj, torch.nn.Module)]
        optimizers = [obj for obj in args if isinstance(obj, torch.optim.Optimizer)]
        if device_placement is not None and len(device_placement) != len(args):
            raise ValueError(
                f"device_placement should be a list with {len(args)} elements (one per object passed to "
                f"prepare); got {len(device_placement)}"
            )
        if models or optimizers:
            if len(models) != 1 or len(optimizers) != 1:
                raise ValueError(
                    "ZeroAccelerator.prepare needs exactly one model together with its optimizer, e.g. "
                    f"accelerator.prepare(model, optimizer, dataloader); got {len(models)} model(s) and "
                    f"{len(optimizers)} optimizer(s)"
                )
            index = next(i for i, obj in enumerate(args) if obj is models[0])
            place = None if device_placement is None else device_placement[index]
            self._attach_engine(
                models[0], _unwrap_optimizer(optimizers[0]), self.device_placement if place is None else place
            )
        return super().prepare(*args, device_placement=device_placement)

    def _attach_engine(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, device_placement: bool
    ) -> None:
        engine = engine_of(model)
        if engine is not None and engine.optimizer is not optimizer:
            raise ValueError("this model is already sharded by hf_zero with a different optimizer")
        placement = decide_placement(
            self._training_device(),
            [engine.device] if engine is not None else _devices_of(model),
            pending=engine is None and PendingWeights.of(model) is not None,
            device_placement=device_placement and engine is None,  # a sharded model cannot move
            cuda_available=torch.cuda.is_available(),
            cpu=self._cpu_requested,
            num_processes=self.num_processes,
        )
        if placement.warning is not None and self.is_main_process:
            warnings.warn(placement.warning, stacklevel=3)
        if engine is None:
            engine = ZeroEngine(model, optimizer, self.zero_config, device=placement.device)
        self.zero_engine = engine

    def _training_device(self) -> torch.device:
        """`accelerator.device` with its GPU index (Accelerate names a single process's GPU `cuda`)."""
        device = self.device
        if device.type == "cuda" and device.index is None:
            return torch.device("cuda", torch.cuda.current_device())
        return device

    def prepare_model(
        self, model: torch.nn.Module, device_placement: bool | None = None, evaluation_mode: bool = False
    ) -> torch.nn.Module:
        """Sharded models get no DDP wrapper and no autocast (they are already on their device); they
        are compiled as Accelerate compiles any prepared model when its dynamo plugin asks for it."""
        if engine_of(model) is None:
            if evaluation_mode:
                return super().prepare_model(model, device_placement=device_placement, evaluation_mode=True)
            raise ValueError(
                "prepare the model together with its optimizer: accelerator.prepare(model, optimizer)"
            )
        if model not in self._models:
            self._models.append(model)
        return self._compile(model)

    def _compile(self, model: torch.nn.Module) -> torch.nn.Module:
        """`torch.compile` (whole, or region by region) per Accelerate's dynamo plugin.

        The compiled wrapper runs the same parameters, whose gradient hooks feed the engine; the
        engine, `_models` and checkpoints keep the uncompiled module and its names.
        """
        plugin = self.state.dynamo_plugin
        if plugin.backend == DynamoBackend.NO:
            return model
        if plugin.use_regional_compilation:
            return compile_regions(model, **plugin.to_kwargs())
        return torch.compile(model, **plugin.to_kwargs())

    def prepare_optimizer(self, optimizer: torch.optim.Optimizer, device_placement: bool | None = None):
        """Wrap the engine's optimizer; its state already lives on the right device."""
        if isinstance(optimizer, AcceleratedOptimizer):
            if optimizer not in self._optimizers:
                self._optimizers.append(optimizer)
            return optimizer
        return super().prepare_optimizer(optimizer, device_placement=False)

    def _engine(self) -> ZeroEngine:
        if self.zero_engine is None:
            raise RuntimeError("call accelerator.prepare(model, optimizer) before training")
        return self.zero_engine

    def _engine_for(self, model: torch.nn.Module) -> ZeroEngine | None:
        """The engine sharding `model` (prepared, compiled or not), if any."""
        return engine_of(self.unwrap_model(model, keep_torch_compile=False))

    # ---- training ----------------------------------------------------------------------------------

    def backward(self, loss: torch.Tensor, **kwargs: Any) -> None:
        """Backpropagate through the engine (the loss is divided by Accelerate's accumulation steps)."""
        kwargs.pop("learning_rate", None)
        self._engine().backward(loss / self.gradient_accumulation_steps, **kwargs)

    def clip_grad_norm_(self, parameters: Any, max_norm: float, norm_type: float = 2) -> torch.Tensor | None:
        """Clip the global norm of the sharded gradients (the `parameters` argument is not needed).

        Inside `accumulate`, a micro-batch that does not end the step returns None and changes
        nothing (as under DeepSpeed): the gradient is not complete yet, and measuring it would
        reduce it, closing the step to the micro-batches still to come. Loops that clip on every
        micro-batch thus clip once per step, on the whole gradient."""
        if norm_type != 2:
            raise ValueError(f"hf_zero clips by the 2-norm only; got norm_type={norm_type}")
        if not self.sync_gradients:
            return None
        return self._engine().clip_grad_norm_(max_norm)

    def unscale_gradients(self, optimizer: Any = None) -> None:
        """Loss scaling is the engine's business: it unscales inside the optimizer step."""

    @contextlib.contextmanager
    def no_sync(self, model: torch.nn.Module):
        """Gradients accumulate in the engine across micro-batches; nothing to suspend."""
        yield

    @property
    def optimizer_step_was_skipped(self) -> bool:
        """Whether the last optimizer step was skipped because the fp16 gradient overflowed on some
        rank (the Trainer then leaves the LR schedule where it is); never in fp32/bf16."""
        return self.zero_engine is not None and self.zero_engine.last_step_skipped

    # ---- weights and checkpoints -------------------------------------------------------------------

    def get_state_dict(self, model: torch.nn.Module, unwrap: bool = True) -> dict[str, torch.Tensor]:
        """The model's complete weights; for the sharded model, its full fp32 master weights.

        For the sharded model this is a collective, as under DeepSpeed ZeRO-3: every rank must
        call it. The rank(s) that write files (the main process; each node's main process with
        `save_on_each_node`) get CPU tensors under the unwrapped model's names, tied weights
        sharing one tensor; the others get an empty dict and hold no host copy.
        """
        engine = self._engine_for(model)
        if engine is None:
            return super().get_state_dict(model, unwrap=unwrap)
        return engine.full_state_dict(keep=self._writes_files())

    def save_model(
        self,
        model: torch.nn.Module,
        save_directory: str | os.PathLike,
        max_shard_size: int | str = "10GB",
        safe_serialization: bool = True,
    ) -> None:
        """`Accelerator.save_model`; for the sharded model, its full fp32 weights are gathered and
        written one unit at a time (the writing process holds one unit and one output file's worth
        on the host), as safetensors. Every rank must call it."""
        engine = self._engine_for(model)
        if engine is None or not safe_serialization:
            super().save_model(model, save_directory, max_shard_size, safe_serialization)
            return
        save_full_weights(engine, save_directory, keep=self._writes_files(), max_shard_size=max_shard_size)

    def save(self, obj: Any, f: Any, safe_serialization: bool = False) -> None:
        """`Accelerator.save`, atomic when `f` is a path: the file appears complete or not at all."""
        if not isinstance(f, (str, os.PathLike)) or not self._writes_files():
            super().save(obj, f, safe_serialization=safe_serialization)
            return
        save = super().save
        write_atomically(f, lambda partial: save(obj, partial, safe_serialization=safe_serialization))

    def _writes_files(self) -> bool:
        """Whether this process writes the files saved once per job (or once per node), as `save` does."""
        if self.project_configuration.save_on_each_node:
            return self.is_local_main_process
        return self.is_main_process

    def save_state(
        self, output_dir: str | None = None, safe_serialization: bool = True, **save_model_func_kwargs: Any
    ) -> Path:
        """Save everything `Accelerator.save_state` saves; hf_zero writes the sharded model and optimizer.

        Every rank must call it. Besides Accelerate's files, the folder gets the engine's
        checkpoint in `hf_zero_checkpoint/` (a PEFT model's frozen base left out: the script
        rebuilds it); `safe_serialization` applies to Accelerate's own files only. The sharded
        model and its optimizer are not handed to save-state pre-hooks. With
        `ZeroConfig.async_checkpoints` the engine's checkpoint is finished in the background: the
        next `save_state` or `load_state` (or `engine.wait_for_checkpoint()`) waits for it.
        """
        engine = self.zero_engine
        if engine is None:
            return super().save_state(
                output_dir, safe_serialization=safe_serialization, **save_model_func_kwargs
            )
        # Accelerate deletes checkpoints beyond `total_limit` first: the one in flight must be whole.
        engine.wait_for_checkpoint()
        with self._hidden_from_accelerate(engine):
            location = super().save_state(
                output_dir, safe_serialization=safe_serialization, **save_model_func_kwargs
            )
        engine.save_checkpoint(
            Path(location) / TRAINER_SUBFOLDER, include_frozen=not is_peft_model(engine.module)
        )
        return location

    def load_state(
        self, input_dir: str | None = None, load_kwargs: dict | None = None, **load_model_func_kwargs: Any
    ) -> None:
        """Load what `save_state` saved: the engine's weights and this rank's shard, then the rest.

        Every rank must call it; the checkpoint may come from another number of processes or
        another ZeRO stage. Accelerate restores the RNG states. The sharded model and its
        optimizer are not handed to load-state pre-hooks.
        """
        engine = self.zero_engine
        if engine is None:
            super().load_state(input_dir, load_kwargs, **load_model_func_kwargs)
            return
        # Accelerate resolves the folder (automatic naming picks the latest) and passes it to its
        # load-state pre-hooks, which run before it loads anything else.
        handle = self.register_load_state_pre_hook(
            lambda models, folder: engine.load_checkpoint(Path(folder) / TRAINER_SUBFOLDER, restore_rng=False)
        )
        try:
            with self._hidden_from_accelerate(engine):
                super().load_state(input_dir, load_kwargs, **load_model_func_kwargs)
        finally:
            handle.remove()

    @contextlib.contextmanager
    def _hidden_from_accelerate(self, engine: ZeroEngine) -> Iterator[None]:
        """Keep the sharded model and its optimizer out of Accelerate's own checkpoint code."""
        models, optimizers = self._models, self._optimizers
        self._models = [model for model in models if engine_of(model) is not engine]
        self._optimizers = [opt for opt in optimizers if _unwrap_optimizer(opt) is not engine.optimizer]
        try:
            yield
        finally:
            self._models, self._optimizers = models, optimizers


def _launched_world_size() -> int:
    """How many processes the launcher started: the process group's size, else WORLD_SIZE."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def _devices_of(model: torch.nn.Module) -> set[torch.device]:
    """The devices the model's parameters and buffers are on."""
    return {tensor.device for tensor in (*model.parameters(), *model.buffers())}


def _unwrap_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    while isinstance(optimizer, AcceleratedOptimizer):
        optimizer = optimizer.optimizer
    return optimizer
