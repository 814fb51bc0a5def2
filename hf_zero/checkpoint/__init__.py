"""Sharded safetensors checkpoints: save on any ranks, resume on any world size and stage (merged
into a `save_pretrained` folder by `hf-zero merge`, `cli/merge.py`). See `format.py` for the
layout of a checkpoint folder."""

from .format import MANIFEST, CheckpointError, is_checkpoint, read_manifest
from .load import load_checkpoint
from .save import save_checkpoint

__all__ = [
    "MANIFEST",
    "CheckpointError",
    "is_checkpoint",
    "load_checkpoint",
    "read_manifest",
    "save_checkpoint",
]
