"""Which engine manages a model, and which a parameter.

The engine registers itself here when it is set up; the public calls (`engine_of`, `full_grad`,
`gathered_parameters`) and the routed PyTorch calls look it up, without importing the engine.
Both maps hold weak references, so a model or parameter never keeps an engine alive.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from ..core.engine_view import EngineView

_ENGINE_ATTR = "_hf_zero_engine"
# Parameter -> engine managing it (keyed by identity: tensors compare elementwise).
_ENGINE_OF_PARAM = WeakIdKeyDictionary()


def register(engine: EngineView) -> None:
    """Record that `engine` manages its module and every parameter of its segments."""
    reference = weakref.ref(engine)
    engine.module.__dict__[_ENGINE_ATTR] = reference
    for group in engine.groups + engine.frozen:
        for param in group.params:
            _ENGINE_OF_PARAM[param] = reference


def managing_engine(module: nn.Module) -> EngineView | None:
    """The engine managing `module`, if any."""
    ref = module.__dict__.get(_ENGINE_ATTR)
    return ref() if ref is not None else None


def engine_of_parameter(param: torch.Tensor) -> EngineView | None:
    """The engine managing `param`, if any."""
    ref = _ENGINE_OF_PARAM.get(param)
    return ref() if ref is not None else None
