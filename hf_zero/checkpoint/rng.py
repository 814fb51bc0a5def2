"""Random number generator states as JSON: Python's, NumPy's, torch's CPU and CUDA generators."""

from __future__ import annotations

import base64
import random
from typing import Any

import torch


def _encode_bytes(state: torch.Tensor) -> str:
    return base64.b64encode(state.cpu().numpy().tobytes()).decode("ascii")


def _decode_bytes(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8).clone()


def capture_rng(device: torch.device) -> dict[str, Any]:
    """This process's generator states (CUDA's for `device` when it is a GPU)."""
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "torch": _encode_bytes(torch.get_rng_state()),
    }
    try:
        import numpy as np

        name, keys, position, has_gauss, cached = np.random.get_state()
        state["numpy"] = [name, keys.tolist(), int(position), int(has_gauss), float(cached)]
    except ImportError:
        pass
    if device.type == "cuda":
        state["cuda"] = _encode_bytes(torch.cuda.get_rng_state(device))
    return state


def restore_rng(state: dict[str, Any], device: torch.device) -> None:
    """Set this process's generators to what `capture_rng` recorded."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(_decode_bytes(state["torch"]))
    if "numpy" in state:
        import numpy as np

        name, keys, position, has_gauss, cached = state["numpy"]
        np.random.set_state((name, np.array(keys, dtype=np.uint32), position, has_gauss, cached))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(_decode_bytes(state["cuda"]), device)
