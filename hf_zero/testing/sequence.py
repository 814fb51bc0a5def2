"""Run several launchable checks one after another in the same ranks: one torchrun launch instead of
one per check (on the CPU, a launch's start-up alone costs about 15 CPU-seconds).

    torchrun --standalone --nproc_per_node 2 -m hf_zero.testing.sequence CHECK OUT_DIR [CHECK OUT_DIR ...]

Each CHECK names a module of `hf_zero.testing` that has a `run(out: Path)` (`late_gradient`,
`stage3_checks`): what the module's own launch does between joining the default gloo process group
and leaving it, writing its files into OUT_DIR as that launch would. The checks build their own
models and engines; before each one, torch's global generator goes back to the state a fresh
process starts with, and the last check's engines are collected.
"""

from __future__ import annotations

import gc
import importlib
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from .launch import exit_cleanly


def main(argv: list[str]) -> None:
    if not argv or len(argv) % 2:
        raise SystemExit("usage: CHECK OUT_DIR [CHECK OUT_DIR ...]")
    checks = [
        (importlib.import_module(f"{__package__}.{name}"), Path(out))
        for name, out in zip(argv[::2], argv[1::2], strict=True)
    ]
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    for module, out in checks:
        gc.collect()
        torch.manual_seed(torch.initial_seed())
        module.run(out)
    exit_cleanly()


if __name__ == "__main__":
    main(sys.argv[1:])
