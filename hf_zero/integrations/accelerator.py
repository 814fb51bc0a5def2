"""`ZeroAccelerator`: an `accelerate.Accelerator` that shards with hf_zero instead of wrapping in DDP.

`prepare(model, optimizer, ...)` hands the model and its optimizer to the ZeRO engine (the model
comes back as itself, its parameters now views into flat buffers, compiled if Accelerate's dynamo
plugin asks for it; the optimizer as an `AcceleratedOptimizer` around the engine's shard optimizer)
and prepares data loaders and schedulers as Accelerate always does. `backward`, `clip_grad_norm_`
and `no_sync` go through the engine. Precision is the engine's business, so Accelerate's autocast
and GradScaler stay off.

Checkpoints: `save_state`/`load_state` keep everything Accelerate saves (schedulers, data loader
samplers, RNG states, objects registered for checkpointing, `step`, automatic naming and
`total_limit` rotation) except the sharded model and its optimizer, which hf_zero writes itself:
the full fp32 weights once (`hf_zero_model.safetensors`) and, per rank, that rank's fp32 master
shards and optimizer state (`hf_zero_shard_rank00000_of_00002.safetensors`). Accelerate's own
writer would keep one view per flat buffer (safetensors drops tensors that share storage) and only
rank 0's optimizer shard. `get_state_dict` and `save_model` give the full fp32 weights.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.optimizer import AcceleratedOptimizer
from accelerate.utils import DynamoBackend, compile_regions
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..config import ZeroConfig
from ..engine import ZeroEngine, check_available, engine_of
from ..saving import save_full_weights

_ACCELERATE_TO_ZERO_PRECISION = {"no": "fp32", "bf16": "bf16", "fp16": "fp16"}

MODEL_FILE = "hf_zero_model.safetensors"
_SHARD_PREFIX = "hf_zero_shard_rank"
_LAYOUT_KEY = "hf_zero_shard_layout"  # safetensors metadata: the shard state with tensors named


def shard_file_name(rank: int, world_size: int) -> str:
    """The file holding rank `rank`'s masters and optimizer state in a checkpoint of `world_size` ranks."""
    return f"{_SHARD_PREFIX}{rank:05d}_of_{world_size:05d}.safetensors"


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

        Every rank must call it. Besides Accelerate's files, the folder gets the full fp32 weights
        (`hf_zero_model.safetensors`, written once) and one safetensors file per rank with its
        master shards and optimizer state, each written atomically; `safe_serialization` applies
        to Accelerate's own files only. The sharded model and its optimizer are not handed to
        save-state pre-hooks. Resume with the same number of processes and ZeRO stage.
        """
        engine = self.zero_engine
        if engine is None:
            return super().save_state(
                output_dir, safe_serialization=safe_serialization, **save_model_func_kwargs
            )
        with self._hidden_from_accelerate(engine):
            location = super().save_state(
                output_dir, safe_serialization=safe_serialization, **save_model_func_kwargs
            )
        save_engine_state(engine, location, write_weights=self._writes_files())
        self.wait_for_everyone()  # every rank's shard is on disk before any rank moves on
        return location

    def load_state(
        self, input_dir: str | None = None, load_kwargs: dict | None = None, **load_model_func_kwargs: Any
    ) -> None:
        """Load what `save_state` saved: the engine's weights and this rank's shard, then the rest.

        Every rank must call it, with the number of processes and ZeRO stage the checkpoint was
        saved with. The sharded model and its optimizer are not handed to load-state pre-hooks.
        """
        engine = self.zero_engine
        if engine is None:
            super().load_state(input_dir, load_kwargs, **load_model_func_kwargs)
            return
        # Accelerate resolves the folder (automatic naming picks the latest) and passes it to its
        # load-state pre-hooks, which run before it loads anything else.
        handle = self.register_load_state_pre_hook(lambda models, folder: load_engine_state(engine, folder))
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


def _unwrap_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    while isinstance(optimizer, AcceleratedOptimizer):
        optimizer = optimizer.optimizer
    return optimizer


# ---- the engine's part of a checkpoint --------------------------------------------------------------


def write_atomically(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Have `write` fill a temporary file beside `path`, then rename it over `path`.

    `path` ends up complete or untouched; the temporary file is removed when `write` fails.
    """
    path = os.fspath(path)
    partial = f"{path}.{uuid.uuid4().hex[:8]}.partial"  # unique: several nodes may share a folder
    try:
        write(partial)
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def save_engine_state(engine: ZeroEngine, folder: str | os.PathLike, write_weights: bool) -> None:
    """Write this rank's shard file into `folder`, and the full fp32 weights where `write_weights`.

    Every rank must call it: gathering the weights is a collective.
    """
    folder = Path(folder)
    weights = engine.full_state_dict(keep=write_weights)
    if write_weights:
        unique = _without_aliases(weights)
        write_atomically(folder / MODEL_FILE, lambda partial: save_file(unique, partial, {"format": "pt"}))
    tensors: dict[str, torch.Tensor] = {}
    layout = _pack(engine.shard_state_dict(), "shard", tensors)
    metadata = {"format": "pt", _LAYOUT_KEY: json.dumps(layout)}
    write_atomically(
        folder / shard_file_name(engine.rank, engine.world_size),
        lambda partial: save_file(tensors, partial, metadata),
    )


def load_engine_state(engine: ZeroEngine, folder: str | os.PathLike) -> None:
    """Restore the engine from the files `save_engine_state` wrote into `folder`.

    Every rank must call it, with the world size and ZeRO stage of the save. The full weights set
    frozen weights and buffers; this rank's shard then sets its fp32 masters and optimizer state
    exactly.
    """
    folder = Path(folder)
    shard_path = folder / shard_file_name(engine.rank, engine.world_size)
    if not shard_path.is_file():
        raise _missing_shard_error(folder, engine.world_size)
    if not (folder / MODEL_FILE).is_file():
        raise FileNotFoundError(
            f"{folder} has no {MODEL_FILE}: it was not written by ZeroAccelerator.save_state"
        )
    shard = _read_shard(shard_path)
    engine.load_full_state_dict(load_file(folder / MODEL_FILE))
    engine.load_shard_state_dict(shard)


def _missing_shard_error(folder: Path, world_size: int) -> Exception:
    others = sorted(path.name for path in folder.glob(f"{_SHARD_PREFIX}*.safetensors"))
    if others:
        return ValueError(
            f"checkpoint {folder} holds hf_zero shards {others[:2]}... of a run with another number of "
            f"processes, not {world_size}; resume with the number of processes it was saved with"
        )
    return FileNotFoundError(
        f"{folder} has no {shard_file_name(0, world_size)}: it was not written by ZeroAccelerator.save_state"
    )


def _without_aliases(weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One entry per tensor: a tied weight stays under its first name only (safetensors refuses
    aliases; `from_pretrained` and the engine restore a tied weight from any one of its names)."""
    seen: set[int] = set()
    unique = {}
    for name, tensor in weights.items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            unique[name] = tensor.contiguous()
    return unique


def _pack(value: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    """`value` as JSON, each tensor moved into `tensors` under its path (e.g. `shard.optimizer.state[0].exp_avg`).

    Dicts become key/value pairs so integer keys stay integers, and tuples stay tuples.
    """
    if torch.is_tensor(value):
        if path in tensors:
            raise ValueError(f"two entries of the shard state map to the same tensor name {path!r}")
        tensor = value.detach().to("cpu").contiguous()
        if any(
            tensor.untyped_storage().data_ptr() == t.untyped_storage().data_ptr() for t in tensors.values()
        ):
            tensor = tensor.clone()  # safetensors refuses tensors that share storage
        tensors[path] = tensor
        return {"tensor": path}
    if isinstance(value, Mapping):
        return {"dict": [[key, _pack(item, _child(path, key), tensors)] for key, item in value.items()]}
    if isinstance(value, (list, tuple)):
        kind = "tuple" if isinstance(value, tuple) else "list"
        return {kind: [_pack(item, f"{path}[{index}]", tensors) for index, item in enumerate(value)]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(
        f"cannot store {type(value).__name__} at {path} in an hf_zero shard file: the optimizer state may "
        "hold tensors, numbers, strings, None, and lists, tuples and dicts of them"
    )


def _child(path: str, key: Any) -> str:
    return f"{path}.{key}" if isinstance(key, str) else f"{path}[{key}]"


def _unpack(layout: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """Inverse of `_pack`."""
    if not isinstance(layout, dict):
        return layout
    ((kind, content),) = layout.items()
    if kind == "tensor":
        return tensors[content]
    if kind == "dict":
        return {key: _unpack(item, tensors) for key, item in content}
    items = [_unpack(item, tensors) for item in content]
    return tuple(items) if kind == "tuple" else items


def _read_shard(path: Path) -> dict[str, Any]:
    with safe_open(path, framework="pt") as reader:
        layout = (reader.metadata() or {}).get(_LAYOUT_KEY)
    if layout is None:
        raise ValueError(f"{path} is not an hf_zero shard file (its metadata has no {_LAYOUT_KEY!r})")
    return _unpack(json.loads(layout), load_file(path))
