"""How hf_zero shards and trains: `ZeroConfig` (`zero_config.py`), the DeepSpeed config it reads
(`deepspeed.py`) and the precision names (`precision.py`). Imports nothing else of hf_zero."""

from .zero_config import ZeroConfig

__all__ = ["ZeroConfig"]
