"""Launch tiny two-rank trainings many times and check that every rank exits 0 through Python's
ordinary interpreter teardown, the way a user's script ends (nothing calls `os._exit`).

A finished run could die at exit with SIGABRT ("terminate called without an active exception"):
a gloo worker thread was still letting go of a finished collective's tensors when the interpreter
began finalising (see `hf_zero.engine.teardown`). It took a few launches in twenty, so this module
launches many, each rank a fresh interpreter (two plain processes, no launcher, no transformers):

    python -m hf_zero.testing.exit_runs [--launches 20] [--modes branches,offload,nvme,delayed] [--calm]

Modes: `branches` (stage 2, the ranks run different branches), `offload` (stage 3,
offload_optimizer="cpu"), `nvme` (stage 2, offload_optimizer="nvme"), `delayed` (stage 3,
offload_overlap="delayed"). Each rank trains a few steps and evaluates once. Launches cycle
through four endings: the engine made the process group and nothing ends it (`engine_group`);
the script made it and leaves it (`script_group`, as Trainer and Accelerate scripts do); the
script made it and calls `destroy_process_group()` at the end (`script_destroys`); the script
made it and calls `engine.close()` at the end (`script_closes`; the rank then checks that the
close joined the gloo workers of the engine's own stage-3 group and that the engine refuses to
train). Each rank keeps its engine alive until the interpreter tears down, as a script's
module-level engine is.

Unless `--calm`, each rank runs its threads on one CPU with gloo's workers at the lowest priority
once training has started: the main thread then usually runs on to the interpreter's teardown
before a worker has finished with the last collective, the interleaving that aborts, which a
busy machine produces only now and then. Prints one JSON line per mode; exits 1 if any rank
ended otherwise than with status 0.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import hf_zero

MODES = {
    "branches": {"stage": 2, "reduce_bucket_size": 1024},
    "offload": {"stage": 3, "offload_optimizer": "cpu"},
    "nvme": {"stage": 2, "offload_optimizer": "nvme"},
    "delayed": {"stage": 3, "offload_optimizer": "cpu", "offload_overlap": "delayed"},
}
ENDINGS = ("engine_group", "script_group", "script_destroys", "script_closes")
STEPS = 3
VOCAB = 64
LAUNCH_TIMEOUT = 300.0  # seconds for both ranks of one launch; a hang counts as a failure

_ALIVE: list = []  # the rank's engine, alive until the interpreter tears down, as in a script


class _Branches(nn.Module):
    """Embedding, one of two branches (chosen by the caller), head."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width)
        self.branches = nn.ModuleList(
            nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, width)) for _ in range(2)
        )
        self.head = nn.Linear(width, VOCAB)

    def forward(self, tokens: torch.Tensor, branch: int) -> torch.Tensor:
        logits = self.head(self.branches[branch](self.embed(tokens)))
        return nn.functional.cross_entropy(logits.flatten(0, 1), tokens.flatten())


def _crowd_threads(rank: int) -> None:
    """Put every thread of this process on one CPU and gloo's worker threads at the lowest priority."""
    cpu = sorted(os.sched_getaffinity(0))[rank % len(os.sched_getaffinity(0))]
    for task in os.listdir("/proc/self/task"):
        thread = int(task)
        os.sched_setaffinity(thread, {cpu})
        if Path(f"/proc/self/task/{task}/comm").read_text().strip() == "pt_gloo_runloop":
            os.setpriority(os.PRIO_PROCESS, thread, 19)


def _gloo_workers() -> int:
    return sum(
        Path(f"/proc/self/task/{task}/comm").read_text().strip() == "pt_gloo_runloop"
        for task in os.listdir("/proc/self/task")
    )


def _check_close(engine: hf_zero.ZeroEngine, tokens: torch.Tensor, branch: int) -> None:
    """`engine.close()` ends the stage-3 gather group's workers at once, and the engine refuses to train."""
    before = _gloo_workers()
    engine.close()
    joined = before - _gloo_workers()
    if (joined > 0) != (engine.config.stage == 3):
        raise AssertionError(
            f"engine.close() at stage {engine.config.stage} ended {joined} gloo worker threads"
        )
    try:
        engine.backward(engine(tokens, branch))
        engine.step()
    except RuntimeError as error:
        if "closed" not in str(error):
            raise
    else:
        raise AssertionError("a closed engine took a training step")


def run_rank(mode: str, ending: str, nvme_path: str, crowd: bool) -> None:
    """One rank of one launch: train a few steps, then end as a user's script ends."""
    torch.set_num_threads(1)
    if ending != "engine_group":
        dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = _Branches()
    config = dict(MODES[mode], nvme_path=nvme_path if mode == "nvme" else None)
    engine = hf_zero.initialize(model, torch.optim.AdamW(model.parameters(), lr=1e-2), config)
    if crowd:
        _crowd_threads(engine.rank)
    generator = torch.Generator().manual_seed(engine.rank)
    branch = engine.rank % 2 if mode == "branches" else 0
    for _ in range(STEPS):
        tokens = torch.randint(0, VOCAB, (4, 8), generator=generator)
        engine.backward(engine(tokens, branch))
        engine.step()
        engine.zero_grad()
    model.eval()  # a last evaluation: at stage 3 its gathers are the run's last collectives
    with torch.no_grad():
        engine(tokens, branch)
    _ALIVE.append(engine)
    if ending == "script_destroys":
        dist.destroy_process_group()
    elif ending == "script_closes":
        model.train()
        _check_close(engine, tokens, branch)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _launch(mode: str, ending: str, scratch: Path, crowd: bool) -> list[tuple[int | None, str]]:
    """Both ranks of one launch: each rank's exit status (None: hung, killed) and output."""
    port = _free_port()
    ranks = []
    for rank in range(2):
        env = dict(
            os.environ,
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE="2",
            LOCAL_WORLD_SIZE="2",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            OMP_NUM_THREADS="1",
        )
        command = [sys.executable, "-m", "hf_zero.testing.exit_runs", "--rank", mode, ending, str(scratch)]
        ranks.append(
            subprocess.Popen(
                command + ([] if crowd else ["--calm"]),
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    deadline = time.monotonic() + LAUNCH_TIMEOUT
    results = []
    for process in ranks:
        try:
            output, _ = process.communicate(timeout=max(deadline - time.monotonic(), 1.0))
            results.append((process.returncode, output))
        except subprocess.TimeoutExpired:
            process.kill()
            results.append((None, process.communicate()[0]))
    return results


def launch_many(mode: str, launches: int, scratch: Path, crowd: bool = True, first_ending: int = 0) -> dict:
    """Launch `mode` `launches` times, the endings in turn from `first_ending`; the launches in
    which a rank did not exit 0, with its output."""
    failures, endings = [], []
    started = time.monotonic()
    for index in range(launches):
        ending = ENDINGS[(first_ending + index) % len(ENDINGS)]
        endings.append(ending)
        results = _launch(mode, ending, scratch, crowd)
        if any(code != 0 for code, _ in results):
            failures.append(
                {
                    "launch": index,
                    "ending": ending,
                    "exit_codes": [code for code, _ in results],  # negative: killed by that signal
                    "output": [output[-1500:] for _, output in results],
                }
            )
    return {
        "mode": mode,
        "launches": launches,
        "endings": endings,
        "failed": len(failures),
        "seconds": round(time.monotonic() - started, 1),
        "failures": failures,
    }


def launch_modes(modes: list[str], launches: int, scratch: Path, crowd: bool = True) -> Iterator[dict]:
    """`launch_many` for each mode in turn, each mode's report as soon as its launches are over.
    Each mode starts where the last one's endings stopped: one launch per mode runs them all."""
    for number, mode in enumerate(modes):
        yield launch_many(mode, launches, scratch, crowd=crowd, first_ending=number * launches)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m hf_zero.testing.exit_runs", description=__doc__)
    parser.add_argument("--launches", type=int, default=20, help="launches per mode (default 20)")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated, from " + ", ".join(MODES))
    parser.add_argument("--calm", action="store_true", help="leave the threads' CPUs and priorities alone")
    parser.add_argument("--rank", nargs=3, metavar=("MODE", "ENDING", "NVME_PATH"), help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    if options.rank:
        run_rank(*options.rank, crowd=not options.calm)
        return 0
    modes = options.modes.split(",")
    unknown = [mode for mode in modes if mode not in MODES]
    if unknown:
        parser.error(f"unknown mode(s) {unknown}; choose from {list(MODES)}")
    scratch = Path(tempfile.mkdtemp(prefix="hf_zero-exit-"))
    failed = 0
    try:
        for report in launch_modes(modes, options.launches, scratch, crowd=not options.calm):
            failed += report["failed"]
            print(json.dumps(report), flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
