"""What the code around the engine may use of it.

`checkpoint/`, `hub/` and the PyTorch calls routed to the engine (`engine/user_paths.py`) take an
`EngineView` instead of importing `ZeroEngine`: the engine imports them, never the reverse, so
dependencies point down. `ZeroEngine` is the one implementation.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import torch
from torch import nn

from ..config.zero_config import ZeroConfig
from .distributed import Collectives, DistContext
from .flat_group import FlatParamGroup
from .units import Unit
from .watchdog import CollectiveWatch


class EngineView(Protocol):
    """A model trained by hf_zero: its segments, its process group and the calls on its weights."""

    module: nn.Module
    optimizer: torch.optim.Optimizer
    config: ZeroConfig
    ctx: DistContext
    comm: Collectives
    units: list[Unit]
    groups: list[FlatParamGroup]  # trainable segments
    frozen: list[FlatParamGroup]  # frozen segments (stage 3 shards them too)
    unit_of: dict[int, int]  # id(parameter) -> index of its unit
    frozen_dtypes: dict[int, torch.dtype]  # id(frozen tensor) -> the dtype the model gave it
    loss_scaler: Any  # fp16's dynamic loss scaler, else None
    gatherer: Any  # stage 3's unit gatherer, else None
    grad_sync: Any  # the gradient reducer
    whole_step: Any  # the step of optimizers that need whole parameters (`whole_step.py`), else None
    clear_optimizer_grads: Any  # the optimizer's own zero_grad, before hf_zero routed it
    watch: CollectiveWatch  # what the engine is doing, for the hang report
    global_steps: int
    loaded_bytes: int

    @property
    def rank(self) -> int: ...

    @property
    def world_size(self) -> int: ...

    @property
    def device(self) -> torch.device: ...

    def full_state_dict(self, keep: bool = True, trainable_only: bool = False) -> dict[str, torch.Tensor]: ...

    def load_full_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None: ...

    def gather_segment(self, group: Any, keep: bool = True) -> list[tuple[torch.Tensor, torch.Tensor]]: ...

    def host_copy(self, tensor: torch.Tensor) -> torch.Tensor: ...

    def publish_masters(self) -> None: ...

    def full_grad(self, param: torch.Tensor) -> torch.Tensor: ...

    def backward(self, loss: torch.Tensor, **kwargs: Any) -> None: ...

    def end_backward(self, force: bool = False) -> None: ...

    def zero_grad(self, set_to_none: bool = True) -> None: ...

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor: ...

    def generate_gathers_once(self) -> bool: ...

    def write_back(
        self, params: list[torch.Tensor], source: int, before: list[torch.Tensor] | None
    ) -> None: ...
