"""The ordinary PyTorch calls users make on a sharded model, routed to the engine.

After `hf_zero.initialize` the model's parameters are views into flat buffers, their gradients
go to the engine (so `param.grad` stays None) and the fp32 masters live in shards. Each call
below would otherwise silently do nothing or be undone at the next step:

- `optimizer.zero_grad()` / `model.zero_grad()` discard what the engine accumulated;
- `model.load_state_dict(...)` (on the model or any submodule) sets the fp32 masters too;
- `optimizer.add_param_group(...)` is refused at once;
- for a chain of optimizers (`[muon, adamw]`), each one's `step()` steps the chain (the engine
  takes one step for all parameters), and its `zero_grad()` and `add_param_group` act as above;
- the model's next forward marks the end of a backward pass (for loops that call
  `loss.backward()` themselves rather than `engine.backward`);
- `torch.nn.utils.clip_grad_norm_(model.parameters(), ...)` clips through the engine, and
  `clip_grad_value_` on managed parameters is refused;
- at stage 3, `model.generate(...)` gathers the whole model once for the call when it fits (see
  `ZeroConfig.generate_gather`), else keeps every rank's forward passes in step (`synced_gpus`),
  since each one gathers units with the other ranks;
- at stage 3, a transformers model's `model.save_pretrained(folder)` writes the full fp32 weights
  unit by unit (`hub/saving.py`, as `trainer.save_model` does) and the config, from rank 0; the
  model's own would read the parameters' empty storage.

These are every call hf_zero reroutes but one: torch's `env://` rendezvous, wrapped on import
for workers that torchrun restarts (`core/distributed.py`, `_restart_safe_env_rendezvous`).

`install` records each function it replaces on the user's objects (`zero_grad`, `add_param_group`,
a chained optimizer's `step`, `generate`, `save_pretrained`) in a `Patches`, and `engine.close()` puts them all back
together; torch's clipping functions are replaced once per process while any engine is open, and
restored when the last one closes (they behave as torch's own for parameters no engine manages).
The engine's own module and optimizer hooks (gradient, step, stage-3 gathers) are not patches and
stay with the model.
"""

from __future__ import annotations

import functools
import os
import weakref
from typing import Any

import torch
from torch import nn

from ..core.chained_optimizer import ChainedOptimizer
from ..core.engine_view import EngineView
from .calls import gathered_parameters
from .registry import engine_of_parameter


class Patches:
    """The functions hf_zero replaced on objects it does not own, to be put back together."""

    _ABSENT = object()

    def __init__(self) -> None:
        self._replaced: list[tuple[Any, str, Any]] = []  # (object, attribute, what its __dict__ held)
        self._clip_routed = False

    def replace(self, target: Any, name: str, function: Any) -> None:
        """Set `target.name = function` (an instance attribute), remembering what was there."""
        self._replaced.append((target, name, vars(target).get(name, self._ABSENT)))
        setattr(target, name, function)

    def route_clip_functions(self) -> None:
        """Torch's clipping functions, routed while this engine is open (see `_route_clip_functions`)."""
        global _CLIP_USERS
        if not self._clip_routed:
            self._clip_routed = True
            _CLIP_USERS += 1
            _route_clip_functions()

    def remove(self) -> None:
        """Put back everything replaced, newest first; torch's clipping functions once no engine is
        left that routed them. Calling it again does nothing."""
        global _CLIP_USERS
        while self._replaced:
            target, name, previous = self._replaced.pop()
            if previous is self._ABSENT:
                vars(target).pop(name, None)
            else:
                setattr(target, name, previous)
        if self._clip_routed:
            self._clip_routed = False
            _CLIP_USERS -= 1
            if _CLIP_USERS == 0:
                _restore_clip_functions()


def install(engine: EngineView, patches: Patches) -> list:
    """Route the user-facing calls above for `engine` (registered already, see `registry.py`),
    recording the functions replaced in `patches`; returns the hook handles."""
    reference = weakref.ref(engine)
    _route_zero_grad(engine, patches)
    _refuse_add_param_group(engine.optimizer, patches)
    for child in engine.optimizer.optimizers if isinstance(engine.optimizer, ChainedOptimizer) else ():
        patches.replace(child, "step", engine.optimizer.step)
        patches.replace(child, "zero_grad", engine.optimizer.zero_grad)
        _refuse_add_param_group(child, patches)
    patches.route_clip_functions()
    handles = _load_state_dict_hooks(engine)
    handles.append(engine.module.register_forward_pre_hook(_end_backward_on_forward(reference)))
    handles.append(engine.module.register_forward_hook(_end_forward_label(reference)))
    if engine.config.stage == 3:
        _route_generate(engine, patches)
        _route_save_pretrained(engine, patches)
    return handles


def _route_zero_grad(engine: EngineView, patches: Patches) -> None:
    optimizer_zero_grad = engine.optimizer.zero_grad

    def zero_grad(set_to_none: bool = True) -> None:
        engine.zero_grad(set_to_none)

    engine.clear_optimizer_grads = optimizer_zero_grad
    patches.replace(engine.optimizer, "zero_grad", zero_grad)
    patches.replace(engine.module, "zero_grad", zero_grad)


def _refuse_add_param_group(optimizer: torch.optim.Optimizer, patches: Patches) -> None:
    def add_param_group(param_group: dict[str, Any]) -> None:
        raise RuntimeError(
            "optimizer.add_param_group after hf_zero.initialize is not supported: the engine laid out "
            "flat shards for the groups it was given. Build the optimizer with all its param groups "
            "before calling hf_zero.initialize"
        )

    patches.replace(optimizer, "add_param_group", add_param_group)


def _route_generate(engine: EngineView, patches: Patches) -> None:
    """Wrap `generate` on every module of the model that has one (a PEFT model and the model it
    wraps both do)."""
    reference = weakref.ref(engine)
    for module in engine.module.modules():
        original = getattr(module, "generate", None)
        if not callable(original) or getattr(original, "_hf_zero_route", False):
            continue

        def generate(*args: Any, _original=original, **kwargs: Any) -> Any:
            engine = reference()
            if engine is None:
                return _original(*args, **kwargs)
            with engine.watch.engine_call("generate"):
                return _generate(engine, _original, args, kwargs)

        generate = functools.wraps(original)(generate)
        generate._hf_zero_route = True
        patches.replace(module, "generate", generate)


def _route_save_pretrained(engine: EngineView, patches: Patches) -> None:
    """Stage 3: `save_pretrained` on a transformers model (not a PEFT wrapper, which saves adapters
    its own way) writes the full weights through the engine. Every rank must call it (each takes
    part in the gathers); rank 0 writes, unless the caller says it is not the main process. With
    `state_dict=` given, the model's own `save_pretrained` runs unchanged."""
    module = engine.module
    # (by name: the engine imports no transformers)
    if not any(cls.__name__ == "PreTrainedModel" for cls in type(module).__mro__):
        return
    original = module.save_pretrained
    reference = weakref.ref(engine)

    def save_pretrained(
        save_directory: str | os.PathLike,
        is_main_process: bool = True,
        state_dict: dict | None = None,
        max_shard_size: int | str = "5GB",
        safe_serialization: bool = True,
        **kwargs: Any,
    ) -> None:
        engine = reference()
        if engine is None or state_dict is not None:
            return original(
                save_directory,
                is_main_process=is_main_process,
                state_dict=state_dict,
                max_shard_size=max_shard_size,
                safe_serialization=safe_serialization,
                **kwargs,
            )
        if not safe_serialization or kwargs.get("push_to_hub"):
            raise ValueError(
                "at stage 3, model.save_pretrained writes safetensors to a folder only; save there, then "
                "upload the folder (huggingface_hub.upload_folder), or pass state_dict=engine.full_state_dict()"
            )
        from ..hub.saving import save_full_weights  # (imports transformers, which the engine does not)

        writes = is_main_process and engine.rank == 0
        with engine.watch.engine_call("save_pretrained"):
            save_full_weights(engine, save_directory, keep=writes, max_shard_size=max_shard_size)
        if writes:
            module.config.save_pretrained(save_directory)
            if module.can_generate() and module.generation_config is not None:
                module.generation_config.save_pretrained(save_directory)

    save_pretrained = functools.wraps(original)(save_pretrained)
    patches.replace(module, "save_pretrained", save_pretrained)


def _generate(engine: EngineView, original, args: tuple, kwargs: dict) -> Any:
    """`generate` at stage 3: the whole model gathered once, or every rank's passes kept in step."""
    if engine.generate_gathers_once():
        with gathered_parameters(engine.module.parameters()):
            return original(*args, **kwargs)
    if engine.ctx.world_size > 1 and engine.ctx.group is torch.distributed.group.WORLD:
        # (transformers' own all-reduce runs on the world group; under a sub-group the caller must
        # keep the ranks' generation lengths equal.)
        kwargs.setdefault("synced_gpus", True)
    return original(*args, **kwargs)


def _end_backward_on_forward(reference: weakref.ref):
    @torch.compiler.disable
    def hook(module: nn.Module, args: Any) -> None:
        engine = reference()
        if engine is None:
            return
        engine.watch.begin("forward")
        # A forward run inside backward (activation checkpointing recomputes) is not a boundary.
        if engine.grad_sync.pending and torch._C._current_graph_task_id() == -1:
            engine.end_backward()

    return hook


def _end_forward_label(reference: weakref.ref):
    @torch.compiler.disable
    def hook(module: nn.Module, args: Any, output: Any) -> None:
        engine = reference()
        if engine is not None:
            engine.watch.end("forward")

    return hook


def _load_state_dict_hooks(engine: EngineView) -> list:
    """Make `load_state_dict` on any module that owns managed parameters set their fp32 masters.

    Torch copies loaded values into the 16-bit parameters; the hooks hand the loaded values
    themselves (not their 16-bit rounding) to the master shards, so the next step continues from
    what was loaded instead of publishing the old masters over it.
    """
    located = {
        id(p): (group, i) for group in engine.groups + engine.frozen for i, p in enumerate(group.params)
    }
    handles = []
    for module in engine.module.modules():
        owned = [
            (name, located[id(param)])
            for name, param in module.named_parameters(recurse=False)
            if id(param) in located
        ]
        if owned:
            pending: list = []
            handles.append(module.register_load_state_dict_pre_hook(_stash_loaded(owned, pending)))
            handles.append(module.register_load_state_dict_post_hook(_apply_loaded(pending)))
    return handles


def _stash_loaded(owned: list, pending: list):
    def hook(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        if local_metadata.get("assign_to_params_buffers", False):
            raise ValueError(
                "load_state_dict(..., assign=True) would replace parameters that hf_zero keeps in its flat "
                "buffers; load with assign=False (the default) or through engine.load_full_state_dict"
            )
        for name, (group, index) in owned:
            value = state_dict.get(prefix + name)
            if torch.is_tensor(value) and tuple(value.shape) == tuple(group.layout.slots[index].shape):
                # Stage 3: the parameter's storage is released, so torch must not copy into it; the
                # shard takes the value instead and the key is not reported missing.
                if group.sharded_params:
                    del state_dict[prefix + name]
                pending.append((group, index, value, prefix + name))

    return hook


def _apply_loaded(pending: list):
    def hook(module, incompatible_keys) -> None:
        for group, index, value, key in pending:
            group.set_master_values(index, value)
            if group.sharded_params and key in incompatible_keys.missing_keys:
                incompatible_keys.missing_keys.remove(key)
        pending.clear()

    return hook


# ---- torch.nn.utils ---------------------------------------------------------------------------------


_CLIP_USERS = 0  # open engines that routed the clipping functions
_CLIP_ORIGINALS: dict[str, Any] = {}


def _route_clip_functions() -> None:
    """Wrap torch's clipping functions, so they know about sharded parameters (once per process)."""
    utils = torch.nn.utils
    if getattr(utils.clip_grad_norm_, "_hf_zero_route", False):
        return
    _CLIP_ORIGINALS.update(clip_grad_norm_=utils.clip_grad_norm_, clip_grad_value_=utils.clip_grad_value_)
    norm = functools.wraps(utils.clip_grad_norm_)(_clip_grad_norm(utils.clip_grad_norm_))
    value = functools.wraps(utils.clip_grad_value_)(_clip_grad_value(utils.clip_grad_value_))
    for function in (norm, value):
        function._hf_zero_route = True
    for namespace in (utils, utils.clip_grad):
        namespace.clip_grad_norm_ = norm
        namespace.clip_grad_value_ = value


def _restore_clip_functions() -> None:
    """Put torch's own clipping functions back."""
    if not _CLIP_ORIGINALS:
        return
    for namespace in (torch.nn.utils, torch.nn.utils.clip_grad):
        for name, function in _CLIP_ORIGINALS.items():
            setattr(namespace, name, function)
    _CLIP_ORIGINALS.clear()


def _as_list(parameters: Any) -> list[torch.Tensor]:
    return [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)


def _managing_engine(params: list[torch.Tensor], caller: str) -> EngineView | None:
    engines = {id(e): e for e in (engine_of_parameter(p) for p in params) if e is not None}
    if not engines:
        return None
    if len(engines) > 1:
        raise ValueError(
            f"{caller} was given parameters of several hf_zero engines; clip each model on its own"
        )
    (engine,) = engines.values()
    given = {id(p) for p in params}
    missing = [
        n for g in engine.groups for n, p in zip(g.layout.slots, g.params, strict=True) if id(p) not in given
    ]
    if missing:
        raise ValueError(
            f"{caller} was given only some of the parameters hf_zero trains (missing {missing[0].name}, ...): "
            "the engine clips the global norm over all of them. Pass model.parameters(), or call "
            "engine.clip_grad_norm_(max_norm)"
        )
    strangers = [p for p in params if engine_of_parameter(p) is None and p.grad is not None]
    if strangers:
        raise ValueError(
            f"{caller} was given hf_zero's parameters together with {len(strangers)} other tensors that have "
            "gradients; clip the sharded model and the rest separately"
        )
    return engine


def _clip_grad_norm(original):
    def clip_grad_norm_(parameters, max_norm, norm_type=2.0, error_if_nonfinite=False, foreach=None):
        params = _as_list(parameters)
        engine = _managing_engine(params, "torch.nn.utils.clip_grad_norm_")
        if engine is None:
            return original(params, max_norm, norm_type, error_if_nonfinite, foreach)
        if float(norm_type) != 2.0:
            raise ValueError(f"hf_zero clips by the 2-norm only; got norm_type={norm_type}")
        total = engine.clip_grad_norm_(float(max_norm))
        if error_if_nonfinite and not bool(torch.isfinite(total)):
            raise RuntimeError(
                f"The total norm of order {norm_type} for gradients from `parameters` is non-finite, so it "
                "cannot be clipped. To disable this error and scale the gradients by the non-finite norm "
                "anyway, set `error_if_nonfinite=False`"
            )
        return total

    return clip_grad_norm_


def _clip_grad_value(original):
    def clip_grad_value_(parameters, clip_value, foreach=None):
        params = _as_list(parameters)
        if any(engine_of_parameter(p) is not None for p in params):
            raise ValueError(
                "torch.nn.utils.clip_grad_value_ cannot clip hf_zero's sharded gradients (param.grad stays "
                "None: each rank holds a slice of the reduced gradient). Clip by the global norm instead: "
                "torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm) or engine.clip_grad_norm_"
            )
        return original(params, clip_value, foreach)

    return clip_grad_value_
