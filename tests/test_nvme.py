"""NVMe optimizer offload (`offload_optimizer="nvme"`) on one process: the swap file's life, the
host-memory bound, the disk checks, and what an IO failure leaves behind. (Training on 2 ranks,
stages 1-3, equals the same stage without offload: `test_offload.py`.)"""

from __future__ import annotations

import errno
import functools
import gc
import json
import os
import subprocess
import sys
from collections import namedtuple

import pytest
import torch

import hf_zero
from hf_zero.offload.nvme import SwapFailedError
from hf_zero.testing.tiny_models import build_model, make_samples, slice_samples

BATCH = slice_samples(make_samples("gpt2", 4), 0, 4)


def _engine(folder, offload: str = "nvme", optimizer=torch.optim.AdamW, **config):
    model = build_model("gpt2")
    zero = {"stage": 1, "precision": "fp32", "offload_optimizer": offload, "nvme_path": str(folder), **config}
    return hf_zero.initialize(model, optimizer(model.parameters(), lr=1e-2), zero)


def _train(engine, steps: int) -> list[float]:
    losses = []
    for _ in range(steps):
        loss = engine(**BATCH).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


def _swap_descriptors() -> list[str]:
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if ".hf_zero-swap-" in target:
            found.append(target)
    return found


def test_the_swap_file_is_never_visible_and_goes_with_the_engine(tmp_path):
    engine = _engine(tmp_path)
    _train(engine, 2)
    # Unlinked as soon as it was opened: nothing to reuse, nothing left by a crash or Ctrl-C.
    assert list(tmp_path.iterdir()) == []
    assert _swap_descriptors() and all(target.endswith("(deleted)") for target in _swap_descriptors())
    assert engine.swapper.file.size >= engine.memory_breakdown()["nvme"] > 0
    del engine
    gc.collect()
    assert _swap_descriptors() == []


def test_buffered_io_where_the_filesystem_refuses_o_direct(tmp_path, monkeypatch):
    reference = _train(_engine(tmp_path, "none"), 4)
    monkeypatch.delattr(os, "O_DIRECT", raising=False)
    engine = _engine(tmp_path, nvme_buffer_count=2)
    assert not engine.swapper.direct
    assert _train(engine, 4) == reference


def test_a_disk_too_small_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(
        "hf_zero.offload.nvme.shutil.disk_usage", lambda path: usage(10**6, 10**6 - 5000, 5000)
    )
    with pytest.raises(
        OSError, match=r"NVMe offload needs .* but its disk has only 0\.00 GB \(5000 bytes\) free"
    ):
        _engine(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_missing_folder_and_an_unsupported_optimizer_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nvme_path=.*missing.* is not an existing folder"):
        _engine(tmp_path / "missing")
    with pytest.raises(ValueError, match=r"not RMSprop.*offload_optimizer='cpu'"):
        _engine(tmp_path, optimizer=torch.optim.RMSprop)
    # torch's own Adam step would run after the swap took the segment's buffers back.
    amsgrad = functools.partial(torch.optim.AdamW, amsgrad=True)
    with pytest.raises(ValueError, match=r"do not cover AdamW with these settings \(amsgrad"):
        _engine(tmp_path, optimizer=amsgrad)


def test_a_disk_that_fills_while_reserving_names_the_file(tmp_path, monkeypatch):
    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(SwapFailedError, match=r"cannot reserve .* in .*\.hf_zero-swap-.*No space left"):
        _engine(tmp_path)


@pytest.mark.parametrize("call", ["pwritev", "preadv"])
def test_an_io_error_mid_training_stops_it_and_leaves_the_checkpoint_intact(tmp_path, monkeypatch, call):
    (tmp_path / "swap").mkdir()
    engine = _engine(tmp_path / "swap")
    _train(engine, 2)
    engine.save_checkpoint(tmp_path / "checkpoint")
    saved = engine.full_state_dict()
    real = getattr(os, call)
    calls = []

    def failing(fd, buffers, offset):
        calls.append(offset)
        if len(calls) == 2:  # one segment in: the step is half done when it fails
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real(fd, buffers, offset)

    monkeypatch.setattr(os, call, failing)
    what = "writing" if call == "pwritev" else "reading"
    with pytest.raises(SwapFailedError, match=rf"{what} \d+ bytes at offset \d+ of .*\.hf_zero-swap-.*rank0"):
        _train(engine, 1)
    monkeypatch.setattr(os, call, real)
    # Nothing trains on, or publishes, the half-written state.
    for action in (engine.step, lambda: engine.save_checkpoint(tmp_path / "later")):
        with pytest.raises(SwapFailedError, match=r"failed earlier.*restart from the last checkpoint"):
            action()
    resumed = _engine(tmp_path / "swap")
    resumed.load_checkpoint(tmp_path / "checkpoint")
    got = resumed.full_state_dict()
    assert all(torch.equal(got[key], value) for key, value in saved.items())
    assert not (tmp_path / "later").exists()


def test_host_memory_stays_within_the_buffers(tmp_path):
    """Peak RSS of a whole process (a 115 MB model, AdamW): with CPU offload the host holds masters and
    state (343 MB); with NVMe only the step's buffers (2 of them, 71 MB), whatever the model's size."""
    runs = {}
    for offload in ("cpu", "nvme"):
        done = subprocess.run(
            [sys.executable, "-m", "hf_zero.testing.offload_memory", offload, str(tmp_path)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        runs[offload] = json.loads(done.stdout.strip().splitlines()[-1])
    nvme, cpu = runs["nvme"], runs["cpu"]
    memory, state = nvme["memory"], nvme["state"]
    # The compute buffer and gradients (and, for a moment, the model's own weights it replaces)
    # are the same in both runs; what NVMe adds on top is its buffers and temporaries of the size
    # of a segment. The process's peak varies by some 40 MB from run to run (allocator, threads),
    # so the margin is a quarter of the state: holding the state would exceed it fourfold.
    resident = 2 * memory["weights"] + memory["gradients"]
    assert memory["offloaded"] < state / 4 and memory["nvme"] >= state
    assert nvme["growth"] <= resident + memory["offloaded"] + state / 4
    # The measurement sees host state when there is some.
    assert cpu["growth"] >= nvme["growth"] + state / 3
