"""Asynchronous checkpoints: the training thread copies what its rank writes into host buffers and
goes on; a background thread writes the file and the ranks finish the checkpoint between them.

The training thread's part is short: agree on the temporary folder, describe the tensors, copy
this rank's shard of them into `HostSnapshot`'s buffers (reused from save to save) and start the
thread. The thread writes the rank's file from the snapshot, and the ranks then finish the save as
a synchronous save does (every rank's report to rank 0, which writes the manifest and renames the
folder into place), only through the launcher's key-value store instead of collectives: the
training threads keep the process group to themselves, so no collective of a save can come
between those of a step.

One save is in flight at a time. The next save, a load, `engine.close()` and
`engine.wait_for_checkpoint()` wait for it and raise, on every rank, the error it met. The writer
thread is not a daemon: a script that ends while a save is in flight still finishes it.

Host memory: the snapshot holds exactly the bytes of this rank's file (with AdamW, 12 bytes per
trained parameter the rank owns, plus the frozen weights and buffers it writes), allocated at the
first asynchronous save and kept for the next ones; page-locked on a GPU, so the copies leave the
device without staging. Nothing else is copied: the file is written from those buffers.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from ..core.device import DeviceOps
from .format import state_key

# How long a rank waits for the others' reports when the collective timeout is off (0).
_NO_TIMEOUT_S = 7 * 24 * 3600


class HostSnapshot:
    """Host buffers, one per tensor of this rank's file, reused by every asynchronous save whose
    tensors have the same sizes (a run's saves all do)."""

    def __init__(self, device_ops: DeviceOps) -> None:
        self.device_ops = device_ops
        self.buffers: dict[str, torch.Tensor] = {}

    @property
    def nbytes(self) -> int:
        """Host bytes the snapshot holds."""
        return sum(buffer.numel() * buffer.element_size() for buffer in self.buffers.values())

    def take(self, writes: list[tuple[dict[str, Any], torch.Tensor, str]]) -> dict[str, torch.Tensor]:
        """Copy this rank's part of the checkpoint (`records.describe`'s writes) into the buffers
        and return them by file key, once the copies have landed."""
        taken: dict[str, torch.Tensor] = {}
        for record, source, key in writes:
            name = state_key(record["name"], key)
            source = source.detach().reshape(-1)
            buffer = self.buffers.get(name)
            if buffer is None or buffer.numel() != source.numel() or buffer.dtype != source.dtype:
                buffer = self.device_ops.host_empty(source.numel(), source.dtype)
            buffer.copy_(source, non_blocking=True)
            taken[name] = buffer
        self.buffers = taken  # buffers of tensors no longer written are let go
        self.device_ops.synchronize()  # the device's copies are complete before a thread reads them
        return taken

    def release(self) -> None:
        self.buffers = {}


class StoreExchange:
    """What a background save's ranks tell each other, through the launcher's key-value store:
    every rank's report to rank 0, and rank 0's outcome to every rank. `prefix` names the save."""

    def __init__(self, store: Any, prefix: str, rank: int, world_size: int, timeout_s: float) -> None:
        self.store, self.prefix, self.rank, self.world_size = store, prefix, rank, world_size
        self.timeout = timedelta(seconds=timeout_s or _NO_TIMEOUT_S)

    def gather_to_first(self, value: Any) -> list[Any] | None:
        """Rank 0 gets every rank's `value` (JSON), in rank order; the others None."""
        if self.world_size == 1:
            return [value]
        self.store.set(f"{self.prefix}/report/{self.rank}", json.dumps(value))
        if self.rank != 0:
            return None
        keys = [f"{self.prefix}/report/{rank}" for rank in range(self.world_size)]
        self.store.wait(keys, self.timeout)
        values = [json.loads(self.store.get(key)) for key in keys]
        for key in keys:
            self.store.delete_key(key)
        return values

    def broadcast_from_first(self, value: Any) -> Any:
        """Rank 0's `value` (JSON) on every rank."""
        if self.world_size == 1:
            return value
        key = f"{self.prefix}/outcome"
        if self.rank == 0:
            self.store.set(key, json.dumps(value))
            return value
        self.store.wait([key], self.timeout)
        return json.loads(self.store.get(key))


class BackgroundSaves:
    """An engine's asynchronous saves: the snapshot buffers and the one save in flight."""

    def __init__(self, device_ops: DeviceOps) -> None:
        self.snapshot = HostSnapshot(device_ops)
        self._thread: threading.Thread | None = None
        self._target: Path | None = None
        self._error: BaseException | None = None

    @property
    def in_flight(self) -> bool:
        """Whether a save was started and not yet waited for."""
        return self._thread is not None

    def start(self, target: Path, write: Callable[[], None]) -> None:
        """Run `write` (which writes and finishes the checkpoint at `target`) on a new thread."""
        if self._thread is not None:
            raise RuntimeError("an asynchronous checkpoint is still in flight: wait for it first")

        def run() -> None:
            try:
                write()
            except BaseException as error:  # raised on the training thread by `wait`
                self._error = error

        self._target, self._error = target, None
        self._thread = threading.Thread(target=run, name=f"hf_zero checkpoint {target.name}")
        self._thread.start()

    def wait(self) -> Path | None:
        """Wait for the save in flight; its checkpoint folder (None when none was in flight). Its
        error, if it met one, is raised here."""
        thread, target = self._thread, self._target
        if thread is None:
            return None
        thread.join()
        self._thread = self._target = None
        error, self._error = self._error, None
        if error is not None:
            raise error
        return target

    def close(self) -> None:
        """Wait for the save in flight and let the snapshot's buffers go."""
        try:
            self.wait()
        finally:
            self.snapshot.release()
