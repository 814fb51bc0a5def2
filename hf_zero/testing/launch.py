"""Start a module on several local processes through the real launcher (torchrun)."""

from __future__ import annotations

import os
import subprocess
import sys

import torch.distributed as dist


def torchrun(module: str, nproc: int, args: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `python -m module args...` on `nproc` local ranks; raise with the output if it fails."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    env.setdefault("HF_HUB_OFFLINE", "1")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nnodes",
        "1",
        "--nproc_per_node",
        str(nproc),
        "-m",
        module,
        *args,
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(
            f"{' '.join(command)} failed with exit code {result.returncode}\n"
            f"--- stdout ---\n{result.stdout[-6000:]}\n--- stderr ---\n{result.stderr[-12000:]}"
        )
    return result


def exit_cleanly() -> None:
    """End a launched rank: leave the process group, flush output, skip interpreter teardown.

    Gloo's worker threads can abort the process while Python tears its modules down (seen as
    "terminate called without an active exception", also in PyTorch's own gloo tests, issue
    65231), which would fail a launch whose work is done.
    """
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
