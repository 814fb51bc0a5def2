"""`ZeroEngine`: ZeRO stages 0-2 over any Hugging Face or plain PyTorch model.

`hf_zero.initialize(model, optimizer, config)` re-homes the model's trainable parameters into
flat buffers (see `layout.py`), gives each rank fp32 master weights for its slice only, turns the
user's optimizer into an optimizer over those slices (in place, see `optim.py`) and installs one
gradient hook per parameter (see `grad_sync.py`). The optimizer's own `step()` then does the
whole ZeRO step through step hooks: reduce gradients, clip, update the shard (Adam/AdamW groups
in one fused pass, see `fused_adam.py`), all-gather the new weights. So `engine.step()`,
`optimizer.step()` and the Trainer's optimizer step are the same.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .config import ZeroConfig
from .distributed import Collectives, DistContext, setup_distributed
from .flat_group import FlatParamGroup
from .fused_adam import fused_adam_step, supports_fused_adam
from .grad_sync import BucketedReduceScatter, StepTimeReduction
from .layout import FlatLayout
from .optim import check_elementwise, rebind_to_shards
from .precision import compute_dtype_for

_ENGINE_ATTR = "_hf_zero_engine"


def engine_of(module: nn.Module) -> ZeroEngine | None:
    """The engine managing `module`, if any."""
    ref = module.__dict__.get(_ENGINE_ATTR)
    return ref() if ref is not None else None


class ZeroEngine(nn.Module):
    """A model trained with ZeRO sharding; see `hf_zero.initialize`.

    Use it like the model (`engine(**batch)`), then `engine.backward(loss)` and `engine.step()`.
    Gradients of successive backward passes add up until `step()`, which consumes them.
    """

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, config: ZeroConfig) -> None:
        super().__init__()
        check_available(config)
        check_elementwise(optimizer, config.allow_untested_optimizer)
        if engine_of(module) is not None:
            raise ValueError("this model is already managed by an hf_zero engine; initialize it only once")
        self.module = module
        self.optimizer = optimizer
        self.config = config
        self.compute_dtype = compute_dtype_for(config.precision)
        self.ctx: DistContext = setup_distributed(_device_of(module))
        self.comm = Collectives(self.ctx)

        self.source_param_names = _names_in_groups(module, optimizer)
        named = _trainable_parameters_by_group(module, optimizer)
        module.to(self.ctx.device)
        self._broadcast_module_state()
        self._cast_frozen_parameters({id(param) for pairs in named for _, param in pairs})
        num_shards = 1 if config.stage == 0 else self.ctx.world_size
        self.groups: list[FlatParamGroup] = []
        for names_and_params in named:
            names = [name for name, _ in names_and_params]
            params = [param for _, param in names_and_params]
            layout = FlatLayout(names, [p.shape for p in params], num_shards, config.reduce_bucket_size)
            self.groups.append(
                FlatParamGroup(
                    params,
                    layout,
                    self.ctx.rank,
                    self.compute_dtype,
                    self.ctx.device,
                    keep_full_grads=config.stage < 2,
                )
            )
        rebind_to_shards(
            optimizer,
            [g.params for g in self.groups],
            [g.master for g in self.groups],
            [g.layout for g in self.groups],
            self.ctx.rank,
        )
        if config.stage == 2:
            self.grad_sync = BucketedReduceScatter(self.groups, self.comm, 2 if config.overlap_comm else 0)
        else:
            self.grad_sync = StepTimeReduction(self.groups, self.comm, scatter=config.stage == 1)

        self._hooks = [
            param.register_post_accumulate_grad_hook(self._grad_hook(group, index))
            for group in self.groups
            for index, param in enumerate(group.params)
        ]
        self._hooks.extend(self._install_load_state_dict_hooks())
        self._hooks.append(optimizer.register_step_pre_hook(self._before_optimizer_step))
        self._hooks.append(optimizer.register_step_post_hook(self._after_optimizer_step))
        module.__dict__[_ENGINE_ATTR] = weakref.ref(self)

        self._reset_step_state()
        self.last_grad_norm: torch.Tensor | None = None
        self.last_step_comm_bytes = 0
        self.global_steps = 0
        self.comm.bytes_sent = 0

    # ---- set-up helpers ---------------------------------------------------------------------------

    def _broadcast_module_state(self) -> None:
        """Start every rank from rank 0's weights and buffers, as DistributedDataParallel does."""
        with torch.no_grad():
            for tensor in list(self.module.parameters()) + list(self.module.buffers()):
                self.comm.broadcast(tensor.data, src=0)

    def _cast_frozen_parameters(self, managed: set[int]) -> None:
        """Frozen floating-point weights compute in the same dtype as the trainable ones."""
        for param in self.module.parameters():
            if id(param) not in managed and param.is_floating_point() and param.dtype != self.compute_dtype:
                param.data = param.data.to(self.compute_dtype)

    def _install_load_state_dict_hooks(self) -> list:
        """Make `model.load_state_dict(...)` (on the model or any submodule) set the fp32 masters.

        Torch copies loaded values into the 16-bit parameters; each module owning managed
        parameters also hands the loaded values of those parameters to their master shards, so the
        next step continues from what was loaded instead of publishing the old masters over it.
        """
        slot_of = {
            id(param): (group, index) for group in self.groups for index, param in enumerate(group.params)
        }
        handles = []
        for module in self.module.modules():
            owned = [
                (name, slot_of[id(param)])
                for name, param in module.named_parameters(recurse=False)
                if id(param) in slot_of
            ]
            if owned:
                pending: list = []
                handles.append(module.register_load_state_dict_pre_hook(_stash_loaded(owned, pending)))
                handles.append(module.register_load_state_dict_post_hook(_apply_loaded(pending)))
        return handles

    def _grad_hook(self, group: FlatParamGroup, index: int):
        def hook(param: torch.Tensor) -> None:
            grad = param.grad
            if grad is not None:
                self.grad_sync.on_grad(group, index, grad)
                param.grad = None

        return hook

    # ---- the training-loop API ------------------------------------------------------------------

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the wrapped model."""
        return self.module(*args, **kwargs)

    @property
    def loss_scale(self) -> float:
        """The factor `backward` multiplies the loss by (1.0 outside fp16)."""
        return 1.0

    @property
    def world_size(self) -> int:
        return self.ctx.world_size

    @property
    def rank(self) -> int:
        return self.ctx.rank

    @property
    def device(self) -> torch.device:
        return self.ctx.device

    def backward(self, loss: torch.Tensor, **kwargs: Any) -> None:
        """Backpropagate `loss`; gradients add to those of earlier backward calls since the last step."""
        if self._grads_reduced:
            raise RuntimeError(
                "backward() after the gradients were already reduced for this step (by clip_grad_norm_); "
                "call step() or zero_grad() first"
            )
        loss.backward(**kwargs)
        self.grad_sync.finish_backward()

    def step(self) -> None:
        """Take one optimizer step on the accumulated gradients and clear them."""
        self.optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Discard gradients accumulated since the last step."""
        self.grad_sync.discard()
        for group in self.groups:
            group.clear_grads()
        self.module.zero_grad(set_to_none=set_to_none)
        self._reset_step_state()

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Global 2-norm of the accumulated (rank-averaged) gradient; scales it down to `max_norm`.

        Returns the norm before clipping. An infinite `max_norm` only measures. The scaling is
        applied inside the optimizer step (folded into the fused update where there is one), so
        the host never waits for the norm.
        """
        self._reduce_grads()
        total = self._global_grad_norm()
        if max_norm != float("inf"):
            coefficient = torch.clamp(max_norm / (total + 1e-6), max=1.0)
            self._grad_scale = coefficient if self._grad_scale is None else self._grad_scale * coefficient
            self._clipped = True
        self.last_grad_norm = total
        return total

    def get_global_grad_norm(self) -> torch.Tensor | None:
        """The gradient norm measured for the last (or coming) step, as DeepSpeed's engine reports it."""
        return self.last_grad_norm

    # ---- optimizer step hooks ------------------------------------------------------------------

    def _reduce_grads(self) -> None:
        if not self._grads_reduced:
            self.grad_sync.reduce()
            self._grads_reduced = True

    def _global_grad_norm(self) -> torch.Tensor:
        squares = torch.zeros((), dtype=torch.float32, device=self.ctx.device)
        for group in self.groups:
            squares += _sum_of_squares(group.grad_shard)
        if self.config.stage > 0:
            self.comm.all_reduce(squares)
        return squares.sqrt()

    def _reset_step_state(self) -> None:
        self._grads_reduced = False
        self._clipped = False
        self._grad_scale: torch.Tensor | None = None  # clip (and later unscale) factor, on device
        self._fused_groups: set[int] = set()  # groups the fused kernel updated this step

    def _before_optimizer_step(self, optimizer, args, kwargs) -> None:
        """Reduce and clip, then update Adam groups with the fused kernel; the rest get their
        gradient and are updated by the optimizer's own step, which skips gradient-less params."""
        self._reduce_grads()
        if self.config.gradient_clipping > 0 and not self._clipped:
            self.clip_grad_norm_(self.config.gradient_clipping)
        for index, (group, param_group) in enumerate(zip(self.groups, optimizer.param_groups, strict=True)):
            if supports_fused_adam(optimizer, param_group):
                zero_in_kernel = group.grad_shard is group.accumulator
                fused_adam_step(
                    optimizer, param_group, group.master, group.grad_shard, group.master_out,
                    self._grad_scale, zero_grad=zero_in_kernel,
                )  # fmt: skip
                group.master.grad = None
                self._fused_groups.add(index)
            else:
                if self._grad_scale is not None:
                    group.grad_shard.mul_(self._grad_scale)
                group.master.grad = group.grad_shard

    def _after_optimizer_step(self, optimizer, args, kwargs) -> None:
        works = []
        for index, group in enumerate(self.groups):
            if index not in self._fused_groups:
                group.master.grad = None
                group.round_master()
            works.extend(group.publish(self.comm))
        for work in works:
            work.wait()
        for index, group in enumerate(self.groups):
            if index not in self._fused_groups or group.grad_shard is not group.accumulator:
                group.clear_grads()
        self._reset_step_state()
        self.global_steps += 1
        self.last_step_comm_bytes = self.comm.bytes_sent
        self.comm.bytes_sent = 0

    # ---- state -------------------------------------------------------------------------------------

    def full_state_dict(self, keep: bool = True, trainable_only: bool = False) -> dict[str, torch.Tensor]:
        """The complete, unsharded state dict on every rank, as CPU tensors.

        Trainable weights come from the fp32 master copy, cast back to the dtype the model had
        when it was handed to the engine; frozen weights and buffers are copied as they are. Tied
        weights map to one shared tensor. Every rank must call this (it all-gathers); a rank that
        passes `keep=False` only takes part and gets an empty dict, holding no host copy. With
        `trainable_only`, frozen weights and buffers are left out (a PEFT adapter's save needs
        only its own weights, not a host copy of the frozen base model).

        `model.state_dict()` itself keeps returning what the model computes with (the 16-bit
        weights): the fp32 masters are spread over the ranks, and gathering them is a collective
        every rank must join, which a `state_dict()` call made on one rank cannot do.
        """
        values: dict[int, torch.Tensor] = {}
        for group in self.groups:
            gathered = group.gather_master(self.comm, keep)
            for param, dtype, full in zip(group.params, group.original_dtypes, gathered, strict=keep):
                values[id(param)] = full.to(dtype)
        if not keep:
            return {}
        state = {}
        for name, tensor in self.module.state_dict(keep_vars=True).items():
            found = values.get(id(tensor))
            if found is not None:
                state[name] = found
            elif not trainable_only:
                state[name] = tensor.detach().to("cpu", copy=True)
        return state

    def load_full_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Load complete, unsharded weights (such as a `save_pretrained` folder's) on every rank.

        Trainable weights set the fp32 master shards exactly and reach the model rounded to the
        compute dtype; other entries (frozen weights, buffers) load into the model. A tied weight
        may appear under any of its names. Everything is checked before anything changes. Every
        rank must call this with the same weights.
        """
        module_state = self.module.state_dict(keep_vars=True)
        names_of: dict[int, list[str]] = {}
        for name, tensor in module_state.items():
            names_of.setdefault(id(tensor), []).append(name)
        managed: set[str] = set()
        planned = []
        for group in self.groups:
            values = []
            for param, slot in zip(group.params, group.layout.slots, strict=True):
                names = names_of.get(id(param), [slot.name])
                managed.update(names)
                value = next((state_dict[n] for n in names if n in state_dict), None)
                if value is None:
                    raise ValueError(f"the weights to load have no entry for parameter {' / '.join(names)}")
                if tuple(value.shape) != tuple(slot.shape):
                    raise ValueError(
                        f"parameter {slot.name} has shape {tuple(slot.shape)} but the weights to load "
                        f"hold {tuple(value.shape)}"
                    )
                values.append(value)
            planned.append((group, values))
        rest = {name: value for name, value in state_dict.items() if name not in managed}
        expected = [name for name in module_state if name not in managed]
        missing = [name for name in expected if name not in rest]
        unexpected = [name for name in rest if name not in expected]
        if missing:
            raise ValueError(f"the weights to load have no entry for {missing[:5]}")
        if unexpected:
            raise ValueError(f"the weights to load hold entries the model does not have: {unexpected[:5]}")
        with torch.no_grad():
            for group, values in planned:
                group.master.copy_(
                    group.layout.shard_of(values, group.rank, torch.float32, group.master.device)
                )
            self._publish_masters()
            self.module.load_state_dict(rest, strict=False)

    def _publish_masters(self) -> None:
        """Round every master shard into the compute buffer and all-gather it everywhere."""
        for group in self.groups:
            group.round_master()
        works = [work for group in self.groups for work in group.publish(self.comm)]
        for work in works:
            work.wait()

    def shard_state_dict(self) -> dict[str, Any]:
        """This rank's own training state: its fp32 master shards and its optimizer state."""
        return {
            "world_size": self.ctx.world_size,
            "stage": self.config.stage,
            "masters": [group.master.detach().to("cpu", copy=True) for group in self.groups],
            "optimizer": self.optimizer.state_dict(),
        }

    def load_shard_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `shard_state_dict` returned on this rank (same world size and stage)."""
        saved = (state.get("world_size"), state.get("stage"))
        if saved != (self.ctx.world_size, self.config.stage):
            raise ValueError(
                f"this shard state was saved with world size {saved[0]} and stage {saved[1]}, but the "
                f"engine runs world size {self.ctx.world_size} and stage {self.config.stage}; resume with "
                "the same number of processes and the same stage"
            )
        masters = state["masters"]
        shapes = [tuple(group.master.shape) for group in self.groups]
        if [tuple(m.shape) for m in masters] != shapes:
            raise ValueError(
                f"shard state holds master shards of shapes {[tuple(m.shape) for m in masters]}, expected "
                f"{shapes}: it was saved from a different model or bucket size"
            )
        with torch.no_grad():
            for group, master in zip(self.groups, masters, strict=True):
                group.master.copy_(master)
        self.optimizer.load_state_dict(state["optimizer"])
        self._publish_masters()


def initialize(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    config: ZeroConfig | dict | str | None = None,
) -> ZeroEngine:
    """Shard `model` and `optimizer` per `config` and return the engine that trains them.

    `optimizer` is any elementwise torch optimizer built over `model.parameters()`; it keeps its
    class, param groups and hyper-parameters and becomes `engine.optimizer`, an optimizer over
    this rank's flat shards. Launch with torchrun (or accelerate launch) for several ranks; a plain
    `python` process is a world of one.
    """
    return ZeroEngine(model, optimizer, ZeroConfig.coerce(config))


# ---- module-level helpers ------------------------------------------------------------------------


def check_available(config: ZeroConfig) -> None:
    """Raise a clear error for a config asking for features this release does not have yet.

    The integrations call it when they are built, so a Trainer or Accelerator refuses such a
    config at once rather than when training starts.
    """
    compute_dtype_for(config.precision)
    if config.stage == 3:
        raise NotImplementedError(
            "ZeRO stage 3 (parameter sharding) is not available yet in this hf_zero release; use "
            "stage 0, 1 or 2"
        )
    if config.offload_optimizer != "none" or config.offload_params != "none":
        raise NotImplementedError(
            "offloading to CPU or NVMe is not available yet in this hf_zero release; set "
            "offload_optimizer='none' and offload_params='none'"
        )


def _stash_loaded(owned: list, pending: list):
    """A load_state_dict pre-hook that remembers the incoming values of a module's managed parameters."""

    def hook(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        if local_metadata.get("assign_to_params_buffers", False):
            raise ValueError(
                "load_state_dict(..., assign=True) would replace parameters that hf_zero keeps in its flat "
                "buffers; load with assign=False (the default) or through engine.load_full_state_dict"
            )
        for name, (group, index) in owned:
            value = state_dict.get(prefix + name)
            if torch.is_tensor(value) and tuple(value.shape) == tuple(group.layout.slots[index].shape):
                pending.append((group, index, value))

    return hook


def _apply_loaded(pending: list):
    """A load_state_dict post-hook that writes the remembered values into the fp32 master shards."""

    def hook(module, incompatible_keys) -> None:
        for group, index, value in pending:
            group.set_master_values(index, value.to(group.master.device))
        pending.clear()

    return hook


def _sum_of_squares(tensor: torch.Tensor) -> torch.Tensor:
    """Σx² in fp32 without a tensor-sized temporary: one tree reduction on the GPU; on the CPU,
    where `vector_norm` accumulates sequentially (1e-4 relative error at 5M elements), pairwise
    sums over bounded chunks."""
    if tensor.is_cuda:
        return torch.linalg.vector_norm(tensor).square()
    return sum((chunk.pow(2).sum() for chunk in tensor.split(1 << 22)), torch.zeros((), dtype=torch.float32))


def _device_of(module: nn.Module) -> torch.device | None:
    for param in module.parameters():
        return param.device
    return None


def _names_in_groups(module: nn.Module, optimizer: torch.optim.Optimizer) -> list[list[str | None]]:
    """The model name of every tensor in each param group, in order, as the user built them (frozen
    ones included): what the positional state of an unsharded optimizer refers to."""
    names = {id(p): n for n, p in module.named_parameters()}
    return [[names.get(id(param)) for param in group["params"]] for group in optimizer.param_groups]


def _trainable_parameters_by_group(
    module: nn.Module, optimizer: torch.optim.Optimizer
) -> list[list[tuple[str, nn.Parameter]]]:
    """(name, parameter) pairs of each param group, with the checks that keep sharding exact."""
    names = {id(p): n for n, p in module.named_parameters()}
    in_optimizer = set()
    grouped = []
    for index, group in enumerate(optimizer.param_groups):
        pairs = []
        for param in group["params"]:
            if id(param) not in names:
                raise ValueError(
                    f"param group {index} of the optimizer holds a tensor of shape {tuple(param.shape)} "
                    "that is not a parameter of the model; build the optimizer over model.parameters()"
                )
            in_optimizer.add(id(param))
            if param.requires_grad:
                pairs.append((names[id(param)], param))
        grouped.append(pairs)
    missing = [n for n, p in module.named_parameters() if p.requires_grad and id(p) not in in_optimizer]
    if missing:
        raise ValueError(
            f"parameters {missing[:5]} require grad but are in no param group of the optimizer; add them "
            "to the optimizer or set requires_grad=False"
        )
    return grouped
