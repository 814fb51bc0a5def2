"""Build `ZeroAccelerator` the way Accelerate users do; launch with torchrun.

    torchrun --standalone --nproc_per_node 2 -m hf_zero.testing.accelerate_run MODE OUT_DIR

Modes (each rank writes OUT_DIR/rank{r}.pt, a dict of results):

- `mismatch`: a `ZeroAccelerator` built without `cpu=True` on a machine without GPUs.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from ..integrations.accelerator import ZeroAccelerator
from .launch import exit_cleanly


def _mismatch(out: Path) -> dict:
    try:
        ZeroAccelerator(zero_config={"stage": 2})
    except RuntimeError as error:
        return {"error": str(error)}
    return {"error": None}


MODES = {"mismatch": _mismatch}


def main(argv: list[str]) -> None:
    mode, out = argv[0], Path(argv[1])
    torch.set_num_threads(1)
    torch.manual_seed(0)
    results = MODES[mode](out)
    torch.save(results, out / f"rank{os.environ['RANK']}.pt")
    exit_cleanly()


if __name__ == "__main__":
    main(sys.argv[1:])
