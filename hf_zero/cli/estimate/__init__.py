"""`hf-zero estimate`: what each ZeRO stage and offload choice costs, before anything is trained.

`formulas.py` holds the model of memory and communication (and its derivation), `shape.py` reads
a model's shape without its weights, `zeropp.py` adds ZeRO++'s options at stage 3, `report.py` prints the tables and `command.py` is the command.
"""

from .command import estimate_command, parse_size
from .formulas import Estimate, ModelShape, activation_bytes, estimate, estimate_all
from .shape import EstimateError, load_config, model_shape
from .zeropp import ZeroPlusPlusEstimate, zeropp_estimate, zeropp_estimates

__all__ = [
    "Estimate",
    "EstimateError",
    "ModelShape",
    "ZeroPlusPlusEstimate",
    "activation_bytes",
    "estimate",
    "estimate_all",
    "estimate_command",
    "load_config",
    "model_shape",
    "parse_size",
    "zeropp_estimate",
    "zeropp_estimates",
]
