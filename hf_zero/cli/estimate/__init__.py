"""`hf-zero estimate`: what each ZeRO stage and offload choice costs, before anything is trained.

`formulas.py` holds the model of memory and communication (and its derivation), `shape.py` reads
a model's shape without its weights, `report.py` prints the tables and `command.py` is the command.
"""

from .command import estimate_command, parse_size
from .formulas import Estimate, ModelShape, activation_bytes, estimate, estimate_all
from .shape import EstimateError, load_config, model_shape

__all__ = [
    "Estimate",
    "EstimateError",
    "ModelShape",
    "activation_bytes",
    "estimate",
    "estimate_all",
    "estimate_command",
    "load_config",
    "model_shape",
    "parse_size",
]
