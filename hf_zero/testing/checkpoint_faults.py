"""Checkpoint faults, run in processes of their own by `tests/test_checkpoint_faults.py`.

    python -m hf_zero.testing.checkpoint_faults kill POINT TARGET WEIGHTS_OUT
        train the tiny GPT-2, write its weights to WEIGHTS_OUT, start saving a checkpoint into
        TARGET and SIGKILL this process at POINT of the save (see `KILL_POINTS`; at
        `async_after_rank_file` the save is asynchronous, and the kill comes from its thread while
        the training thread takes another step). `killed_save(POINT, TARGET, WEIGHTS_OUT, LOG)`
        does the same from Python in a process forked from a server that imported this module
        once, as the tests do: a fresh interpreter per kill point would cost its start-up each time.
    torchrun --nproc_per_node 2 -m hf_zero.testing.checkpoint_faults ranks OUT_DIR
        on 2 ranks: an asynchronous save during a step, a damaged rank-1 file, and a save (then an
        asynchronous one) that fails on rank 1 only; each rank writes what it saw to
        OUT_DIR/rank{r}.json.

The kill points are installed by replacing functions of `hf_zero.checkpoint.save` in this process
only; the library itself has no test hooks.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import sys
import threading
from pathlib import Path

import torch
import torch.distributed as dist

import hf_zero
from hf_zero.checkpoint import CheckpointError
from hf_zero.checkpoint import save as save_module
from hf_zero.checkpoint.format import rank_file_name, sha256_of

from .launch import exit_cleanly
from .tiny_models import build_model, make_samples


def trained_engine(steps: int, stage: int = 1) -> hf_zero.ZeroEngine:
    model = build_model("gpt2")
    engine = hf_zero.initialize(model, torch.optim.AdamW(model.parameters(), lr=1e-2), {"stage": stage})
    samples = make_samples("gpt2", 2 * steps)
    for step in range(steps):
        batch = {key: value[2 * step : 2 * step + 2] for key, value in samples.items()}
        engine.backward(engine(**batch).loss)
        engine.step()
        engine.zero_grad()
    return engine


def _die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)


def _install_kill(point: str) -> None:
    """Make the save die at `point`."""
    if point == "before_rank_file":  # the temporary folder exists, nothing in it
        save_module._write_rank_file = _die
    elif point in ("after_rank_file", "async_after_rank_file"):  # the rank file is flushed, no manifest
        write = save_module._write_rank_file
        save_module._write_rank_file = lambda *args: (write(*args), _die())
    elif point == "after_manifest":  # the manifest is written, the folder not yet renamed
        flush = save_module.fsync_path
        save_module.fsync_path = lambda path: _die() if Path(path).is_dir() else flush(path)
    elif point == "before_swap":  # replacing an earlier checkpoint: just before the swap
        save_module._exchange = _die
    elif point == "after_swap":  # replaced: the new one is in place, the old not yet removed
        save_module.shutil.rmtree = _die
    else:
        raise ValueError(f"unknown kill point {point!r}")


KILL_POINTS = (
    "before_rank_file",
    "after_rank_file",
    "async_after_rank_file",
    "after_manifest",
    "before_swap",
    "after_swap",
)


def kill(point: str, target: str, weights_out: str) -> None:
    engine = trained_engine(steps=2)
    torch.save(engine.full_state_dict(), weights_out)
    _install_kill(point)
    if point.startswith("async"):
        engine.save_checkpoint(target, asynchronous=True)
        batch = make_samples("gpt2", 2)
        engine.backward(engine(**batch).loss)  # training goes on while the thread writes
        engine.step()
        engine.wait_for_checkpoint()
    else:
        engine.save_checkpoint(target)
    raise SystemExit(f"kill point {point} was never reached")


def _kill_logged(point: str, target: str, weights_out: str, log: str) -> None:
    """`kill` with this process's output (a traceback if the kill point was never reached) in `log`."""
    with open(log, "w") as file:
        os.dup2(file.fileno(), 1)
        os.dup2(file.fileno(), 2)
    kill(point, target, weights_out)


def killed_save(point: str, target: Path, weights_out: Path, log: Path, timeout: float = 300) -> int | None:
    """Run `kill(point, target, weights_out)` in a child of a multiprocessing forkserver that has
    imported this module (and with it torch, transformers and hf_zero), its output going to `log`.
    The child starts from a process that has only imported modules: its one other thread (here) is
    pyarrow's jemalloc background thread, whose locks jemalloc keeps safe across fork. (A fork of
    the caller could copy locks held by its threads: pytest-xdist's, engines'.) Returns the child's
    exit code (`-signal.SIGKILL`: it died at `point`), or None if it ran past `timeout` seconds
    (it is killed then)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])  # takes effect when the server starts, on first use
    child = context.Process(target=_kill_logged, args=(point, str(target), str(weights_out), str(log)))
    child.start()
    child.join(timeout)
    if child.exitcode is None:
        child.kill()
        child.join()
        return None
    return child.exitcode


def ranks(out: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    engine = trained_engine(steps=1, stage=2)
    seen: dict = {}
    engine.save_checkpoint(out / "earlier")
    earlier = {p.name: sha256_of(p) for p in sorted((out / "earlier").iterdir())}
    # An asynchronous save while a step runs: it holds the weights of when it began. Its thread
    # writes only once the step is over (the gate), as a large save on a slow disk would.
    saved = engine.full_state_dict()
    gate, write = threading.Event(), save_module._write_rank_file
    save_module._write_rank_file = lambda *args: (gate.wait(60), write(*args))[1]
    engine.save_checkpoint(out / "async", asynchronous=True)
    batch = {key: value[rank : rank + 1] for key, value in make_samples("gpt2", 2).items()}
    engine.backward(engine(**batch).loss)
    engine.step()
    stepped = engine.full_state_dict()
    seen["async_in_flight"] = engine.background_saves.in_flight
    gate.set()
    save_module._write_rank_file = write
    seen["async_folder"] = str(engine.wait_for_checkpoint())
    engine.load_checkpoint(out / "async")
    loaded = engine.full_state_dict()
    seen["async_holds_its_step"] = all(torch.equal(value, loaded[key]) for key, value in saved.items())
    seen["async_step_moved"] = any(not torch.equal(value, stepped[key]) for key, value in saved.items())
    seen["async_snapshot_bytes"] = engine.background_saves.snapshot.nbytes
    engine.save_checkpoint(out / "damaged")
    if rank == 0:
        path = out / "damaged" / rank_file_name(1, 2)
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))
    dist.barrier()
    try:
        engine.load_checkpoint(out / "damaged")
    except CheckpointError as error:
        seen["damaged"] = str(error)
    if rank == 1:

        def full_disk(*args, **kwargs):
            raise OSError("No space left on device")

        save_module.write_safetensors = full_disk
    try:
        engine.save_checkpoint(out / "failed")
    except OSError as error:
        seen["failed_save"] = str(error)
    engine.save_checkpoint(out / "failed_async", asynchronous=True)  # fails in the thread, later
    try:
        engine.wait_for_checkpoint()
    except OSError as error:
        seen["failed_async"] = str(error)
    dist.barrier()
    seen["leftovers"] = sorted(p.name for p in out.iterdir() if p.name.startswith("."))
    seen["earlier_unchanged"] = earlier == {p.name: sha256_of(p) for p in sorted((out / "earlier").iterdir())}
    before = engine.full_state_dict()
    engine.load_checkpoint(out / "earlier")
    seen["earlier_loads"] = all(torch.equal(v, engine.full_state_dict()[k]) for k, v in before.items())
    (out / f"rank{rank}.json").write_text(json.dumps(seen))
    exit_cleanly()


if __name__ == "__main__":
    if sys.argv[1] == "kill":
        kill(*sys.argv[2:5])
    else:
        ranks(Path(sys.argv[2]))
