"""Read the weights of a `save_pretrained` folder (one safetensors file or an indexed set of them)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def load_pretrained_weights(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of the safetensors weights in `folder`, on the CPU."""
    folder = Path(folder)
    if (folder / INDEX_FILE).is_file():
        index = json.loads((folder / INDEX_FILE).read_text())
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(set(index["weight_map"].values())):
            state.update(load_file(folder / shard))
        return state
    if (folder / SINGLE_FILE).is_file():
        return load_file(folder / SINGLE_FILE)
    raise FileNotFoundError(
        f"no {SINGLE_FILE} or {INDEX_FILE} in {str(folder)!r}: expected a folder written by save_pretrained"
    )
