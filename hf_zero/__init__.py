"""hf_zero: ZeRO sharding for Hugging Face training, in Python and Triton.

Three ways in, one engine: `hf_zero.ZeroTrainer` (a `transformers.Trainer`), the Accelerate
integration (`hf_zero.ZeroAccelerator`), and `hf_zero.initialize(model, optimizer, config)` for
plain PyTorch loops. `hf_zero.from_pretrained` loads a pretrained model of which, at stage 3, each
rank reads only its own shard.
"""

from __future__ import annotations

from typing import Any

from .config.zero_config import ZeroConfig
from .core.chained_optimizer import ChainedOptimizer
from .engine.calls import full_grad, gathered_parameters
from .engine.zero_engine import ZeroEngine, engine_of, initialize
from .version import __version__ as __version__

__all__ = [
    "ChainedOptimizer",
    "MuonWithAdamW",
    "ZeroAccelerator",
    "ZeroConfig",
    "ZeroEngine",
    "ZeroTrainer",
    "engine_of",
    "from_pretrained",
    "full_grad",
    "gathered_parameters",
    "initialize",
    "muon_with_adamw",
]

# The integrations and loading import transformers/accelerate, which takes seconds; load them on first use.
_LAZY = {
    "ZeroTrainer": ".integrations.trainer",
    "ZeroAccelerator": ".integrations.accelerator",
    "from_pretrained": ".hub.loading",
    "MuonWithAdamW": ".integrations.muon",
    "muon_with_adamw": ".integrations.muon",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'hf_zero' has no attribute {name!r}")
