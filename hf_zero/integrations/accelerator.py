"""`ZeroAccelerator`: an `accelerate.Accelerator` that shards with hf_zero instead of wrapping in DDP.

`prepare(model, optimizer, ...)` hands the model and its optimizer to the ZeRO engine (the model
comes back as itself, its parameters now views into flat buffers; the optimizer as an
`AcceleratedOptimizer` around the engine's shard optimizer) and prepares data loaders and
schedulers as Accelerate always does. `backward`, `clip_grad_norm_` and `no_sync` go through the
engine. Precision is the engine's business, so Accelerate's autocast and GradScaler stay off.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.optimizer import AcceleratedOptimizer

from ..config import ZeroConfig
from ..engine import ZeroEngine, check_available, engine_of

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
        zero_config: a `ZeroConfig`, a dict of its fields, or a path to a YAML/JSON file. Features
            this release does not have yet (stage 3, offload, fp16) are refused here.
        *args, **kwargs: passed to `accelerate.Accelerator`. `mixed_precision` (or the launcher's
            setting) fills `ZeroConfig.precision` when that is "auto". On a machine without GPUs,
            pass `cpu=True` when launching several processes.

    Raises:
        RuntimeError: when Accelerate counts a different number of processes than the launcher
            started (each process would otherwise train alone on the same data).
    """

    def __init__(self, *args: Any, zero_config: ZeroConfig | dict | str | None = None, **kwargs: Any) -> None:
        requested = kwargs.get("mixed_precision") or os.environ.get("ACCELERATE_MIXED_PRECISION")
        config = resolve_precision(ZeroConfig.coerce(zero_config), requested)
        check_available(config)  # refuse roadmap features now, not at the first prepare or step
        self.zero_config = config
        kwargs["mixed_precision"] = "no"
        super().__init__(*args, **kwargs)
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
        """Shard the (one) model with its (one) optimizer, then prepare everything as Accelerate does."""
        models = [obj for obj in args if isinstance(obj, torch.nn.Module)]
        optimizers = [obj for obj in args if isinstance(obj, torch.optim.Optimizer)]
        if models or optimizers:
            if len(models) != 1 or len(optimizers) != 1:
                raise ValueError(
                    "ZeroAccelerator.prepare needs exactly one model together with its optimizer, e.g. "
                    f"accelerator.prepare(model, optimizer, dataloader); got {len(models)} model(s) and "
                    f"{len(optimizers)} optimizer(s)"
                )
            self._attach_engine(models[0], _unwrap_optimizer(optimizers[0]))
        return super().prepare(*args, device_placement=device_placement)

    def _attach_engine(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        engine = engine_of(model)
        if engine is None:
            engine = ZeroEngine(model, optimizer, self.zero_config)
        elif engine.optimizer is not optimizer:
            raise ValueError("this model is already sharded by hf_zero with a different optimizer")
        self.zero_engine = engine

    def prepare_model(
        self, model: torch.nn.Module, device_placement: bool | None = None, evaluation_mode: bool = False
    ) -> torch.nn.Module:
        """Sharded models are used as they are: no DDP wrapper, no autocast, already on their device."""
        if engine_of(model) is None:
            if evaluation_mode:
                return super().prepare_model(model, device_placement=device_placement, evaluation_mode=True)
            raise ValueError(
                "prepare the model together with its optimizer: accelerator.prepare(model, optimizer)"
            )
        if model not in self._models:
            self._models.append(model)
        return model

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

    # ---- training ----------------------------------------------------------------------------------

    def backward(self, loss: torch.Tensor, **kwargs: Any) -> None:
        """Backpropagate through the engine (the loss is divided by Accelerate's accumulation steps)."""
        kwargs.pop("learning_rate", None)
        self._engine().backward(loss / self.gradient_accumulation_steps, **kwargs)

    def clip_grad_norm_(self, parameters: Any, max_norm: float, norm_type: float = 2) -> torch.Tensor:
        """Clip the global norm of the sharded gradients (the `parameters` argument is not needed)."""
        if norm_type != 2:
            raise ValueError(f"hf_zero clips by the 2-norm only; got norm_type={norm_type}")
        return self._engine().clip_grad_norm_(max_norm)

    def unscale_gradients(self, optimizer: Any = None) -> None:
        """Loss scaling is the engine's business: it unscales inside the optimizer step."""

    @contextlib.contextmanager
    def no_sync(self, model: torch.nn.Module):
        """Gradients accumulate in the engine across micro-batches; nothing to suspend."""
        yield

    @property
    def optimizer_step_was_skipped(self) -> bool:
        """Whether the last optimizer step was skipped (fp16 overflow); never in fp32/bf16."""
        return False


def _launched_world_size() -> int:
    """How many processes the launcher started: the process group's size, else WORLD_SIZE."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def _unwrap_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    while isinstance(optimizer, AcceleratedOptimizer):
        optimizer = optimizer.optimizer
    return optimizer
