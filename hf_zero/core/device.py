"""The device layer: the engine's page-locked allocations, events and host waits go through one
`DeviceOps`, so the engine never branches on the device type.

`CudaOps` does the real thing: page-locked host memory, events recorded on the current stream,
host waits. `HostOps` runs on the CPU with the same calls and the same bookkeeping, where the
CPU has nothing to wait for (its copies are synchronous, its events complete when recorded, its
memory is pageable), so every branch of the engine runs in CI. Both count what the engine asks of
the device, as a GPU would pay for it:

- `host_syncs`: waits of the host for everything queued on the device (`synchronize`) and reads
  of a device value on the host (`read`, `to_host`), each a full stop of the host's run-ahead;
- `event_waits`: waits of the host for one recorded point (`Event.synchronize`), which leave
  later work queued;
- `pinned_bytes`: page-locked host memory allocated (on the CPU: what a GPU run would lock), in
  whole pages: each host buffer is a mapping of its own, locked with `cudaHostRegister` on a GPU
  (`host_memory.py`), not a block of torch's page-locked allocator rounded up to a power of two;
- `scratch_buffers` and `scratch_allocations`: short-lived buffers asked for (`scratch`), and those
  of them for which memory was allocated (on a GPU each, from torch's caching allocator; on the CPU
  only the new blocks of `HostOps`' pool).

The engine reads the counters per step (`ZeroEngine.device_counts`) and `memory_breakdown()`
reports `pinned`.

Every host wait is also marked in the engine's `CollectiveWatch` (`watch`): on NCCL a collective
that a peer never joins does not block the host where it is issued or waited for (those only queue
work on a stream) but at the next wait for the device, so that is where a hang shows, and where the
hang report must find the rank waiting.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable
from typing import Any

import torch

from .host_memory import Lock, Unlock, mapped_buffer, mapped_length

_HOST_REGISTER_PORTABLE = 1  # cudaHostRegisterPortable


class Event:
    """A point recorded on the device's current stream (`DeviceOps.record`)."""

    def __init__(self, ops: DeviceOps, cuda_event: torch.cuda.Event | None) -> None:
        self._ops = ops
        self._cuda_event = cuda_event

    def synchronize(self) -> None:
        """The host waits until the device has reached this point."""
        self._ops.event_waits += 1
        if self._cuda_event is not None:
            with self._ops.waiting("event"):
                self._cuda_event.synchronize()

    def wait_later(self) -> Callable[[], None]:
        """A wait for this point to make on another thread (counted now, on the calling thread; not
        marked in the watch, which follows the training thread's waits)."""
        self._ops.event_waits += 1
        event = self._cuda_event
        return event.synchronize if event is not None else lambda: None


class DeviceOps:
    """What the engine asks of its device; see the module docstring. Built by `for_device`."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.host_syncs = 0
        self.event_waits = 0
        self.pinned_bytes = 0
        self.scratch_buffers = 0
        self.scratch_allocations = 0
        self.watch: Any = None  # the engine's CollectiveWatch, once it has one

    def waiting(self, what: str) -> contextlib.AbstractContextManager:
        """Mark the block as a host wait for the device (`what`: synchronize, read, ...) in the
        watch, so that a collective stuck on the device is reported where the host waits for it."""
        if self.watch is None:
            return contextlib.nullcontext()
        return self.watch.wait_for_device(what)

    @staticmethod
    def for_device(device: torch.device) -> DeviceOps:
        """The implementation for `device`: CUDA, or the CPU one for anything else."""
        return CudaOps(device) if device.type == "cuda" else HostOps(device)

    def host_empty(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A host buffer that copies to and from the device can leave asynchronously: whole pages of
        its own, starting on a page boundary (`host_memory.mapped_buffer`)."""
        self.pinned_bytes += mapped_length(numel * dtype.itemsize)
        return mapped_buffer(numel, dtype, *self._page_lock())

    def _page_lock(self) -> tuple[Lock | None, Unlock | None]:
        """How a host buffer's pages are locked and unlocked (on the CPU: they are not)."""
        return None, None

    def host_zeros(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """`host_empty`, zeroed: fresh anonymous pages already are (no second pass over them)."""
        return self.host_empty(numel, dtype)

    def scratch(self, numel: int, dtype: torch.dtype, zero: bool = True) -> torch.Tensor:
        """A device buffer (zeroed unless `zero=False`) for one short use, such as a gradient
        bucket's staging during backward, handed back with `recycle` once that use has ended. On a
        GPU a fresh tensor: torch's caching allocator reuses the block once it is freed, and lends it
        to the forward's activations in between, which a pool held here would keep from them."""
        self.scratch_buffers += 1
        self.scratch_allocations += 1
        make = torch.zeros if zero else torch.empty
        return make(numel, dtype=dtype, device=self.device)

    def recycle(self, tensor: torch.Tensor) -> None:
        """`tensor`, from `scratch`, is not used any more (nothing to do on a GPU)."""

    def record(self) -> Event:
        """Record the current point of the device's work, to wait for later."""
        raise NotImplementedError

    def synchronize(self) -> None:
        """The host waits for everything queued on the device so far."""
        self.host_syncs += 1

    def read(self, tensor: torch.Tensor) -> float:
        """The value of a one-element device tensor on the host (a wait for the device)."""
        self.host_syncs += 1
        with self.waiting("read"):
            return tensor.item()

    def to_host(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` copied to host memory, once the device has computed it (a wait for the device)."""
        self.host_syncs += 1
        with self.waiting("to_host"):
            return tensor.to("cpu")

    def counts(self) -> dict[str, int]:
        """The counters, as a dict (see the module docstring)."""
        return {
            "host_syncs": self.host_syncs,
            "event_waits": self.event_waits,
            "pinned_bytes": self.pinned_bytes,
            "scratch_buffers": self.scratch_buffers,
            "scratch_allocations": self.scratch_allocations,
        }


class CudaOps(DeviceOps):
    """A CUDA device: page-locked buffers, CUDA events, real waits."""

    def _page_lock(self) -> tuple[Lock, Unlock]:
        cudart = torch.cuda.cudart()

        def lock(address: int, length: int) -> None:
            try:  # portable: page-locked for every CUDA context, as torch's own pinned memory
                torch.cuda.check_error(cudart.cudaHostRegister(address, length, _HOST_REGISTER_PORTABLE))
            except RuntimeError as error:
                raise MemoryError(
                    f"could not page-lock {length / 2**20:.1f} MiB of host memory ({error}); free host "
                    "memory, or offload less (offload_optimizer / offload_params)"
                ) from error

        def unlock(address: int) -> None:
            torch.cuda.check_error(cudart.cudaHostUnregister(address))

        return lock, unlock

    def record(self) -> Event:
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return Event(self, event)

    def synchronize(self) -> None:
        super().synchronize()
        with self.waiting("synchronize"):
            torch.cuda.current_stream(self.device).synchronize()


class HostOps(DeviceOps):
    """The CPU: the same calls and counts; nothing is queued, so nothing is waited for.

    Scratch buffers are recycled here: the CPU allocator gives a large block back to the system
    when it is freed, and the next one faults in every page anew, which made a fresh zeroed 12 MB
    buffer ten times slower than zeroing a used one (84 MB of gradient staging per step on a
    6-layer GPT-2: 2% of its step). The pool never holds more blocks than were lent at once: a
    request that no free block of its dtype fits replaces the largest of them."""

    def __init__(self, device: torch.device) -> None:
        super().__init__(device)
        self._free: list[torch.Tensor] = []  # blocks not lent
        # Every block made, by id, for as long as it lives (a lent view keeps its block alive, and
        # one dropped without `recycle` frees it as usual).
        self._blocks: weakref.WeakValueDictionary[int, torch.Tensor] = weakref.WeakValueDictionary()

    def scratch(self, numel: int, dtype: torch.dtype, zero: bool = True) -> torch.Tensor:
        self.scratch_buffers += 1
        same = [i for i, block in enumerate(self._free) if block.dtype == dtype]
        fitting = [i for i in same if self._free[i].numel() >= numel]
        if fitting:
            block = self._free.pop(min(fitting, key=lambda i: self._free[i].numel()))
        else:
            if same:
                self._free.pop(max(same, key=lambda i: self._free[i].numel()))
            block = torch.empty(max(numel, 1), dtype=dtype, device=self.device)
            self.scratch_allocations += 1
            self._blocks[id(block)] = block
        view = block[:numel]
        return view.zero_() if zero else view

    def recycle(self, tensor: torch.Tensor) -> None:
        block = tensor._base
        ours = block is not None and self._blocks.get(id(block)) is block
        if ours and not any(free is block for free in self._free):
            self._free.append(block)

    def record(self) -> Event:
        return Event(self, None)
