"""Start a module on several local processes through the real launcher (torchrun)."""

from __future__ import annotations

import os
import subprocess
import sys

import torch.distributed as dist


def local_launch_command(nproc: int, args: list[str]) -> list[str]:
    """The command that runs `args` (a script and its arguments, or `-m module ...`) on `nproc`
    processes of this machine under torchrun."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
        "--nproc_per_node", str(nproc), *args,
    ]  # fmt: skip


def torchrun(module: str, nproc: int, args: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `python -m module args...` on `nproc` local ranks; raise with the output if it fails."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    env.setdefault("HF_HUB_OFFLINE", "1")
    command = local_launch_command(nproc, ["-m", module, *args])
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(
            f"{' '.join(command)} failed with exit code {result.returncode}\n"
            f"--- stdout ---\n{result.stdout[-6000:]}\n--- stderr ---\n{result.stderr[-12000:]}"
        )
    return result


def exit_cleanly() -> None:
    """End a launched rank as a user's script should: wait for the other ranks, leave the process
    group, and exit through the interpreter's ordinary teardown (no `os._exit`: the tests see the
    exit a user sees; what hf_zero's engines hold ends before teardown, see `hf_zero.engine.teardown`)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.exit(0)
