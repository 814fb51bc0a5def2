"""Releasing what an engine holds beyond Python memory, and ending the process groups before the
interpreter ends.

An engine may own threads (the delayed host update, the NVMe swap file's IO pool), file
descriptors (the swap file) and, at stage 3, a process group of its own for gathers. `release`
frees the first two once: from `engine.close()`, when the engine is garbage-collected, or at
interpreter exit, whichever comes first; the group ends at `engine.close()` (`leave_group`) or
with the default group.

Why the process groups must end before the interpreter does: a gloo process group runs worker
threads, and the worker that ran a collective drops its reference to the collective's tensors a
moment after the collective completed. Dropping the last C++ reference to a tensor Python also
holds takes the GIL. When the main thread got the GIL first and ran on into interpreter
finalisation (a script ending right after its last step), Python ends the waiting worker with
`pthread_exit`, whose unwinding through a `noexcept` destructor calls `std::terminate`:
"terminate called without an active exception", SIGABRT, after everything the run wrote was
complete (seen in core dumps: `~AsyncAllgatherWork` -> `decref_pyobject` -> `take_gil` ->
`pthread_exit`; a few launches in twenty, also with torch alone; cf. PyTorch issue 65231).
Destroying a group joins its workers, which then take the GIL from a live interpreter. So at exit, before teardown begins, hf_zero
releases every live engine and, on gloo, destroys the default process group (and with it every
other group, the engines' own included) unless the script already did; hf_zero holds groups only
weakly (see `distributed.py`), so the destroyed groups are really freed. After an uncaught exception nothing
is destroyed: a destroy waits for collectives in flight, which a failing rank's peers may never
finish, and the launcher must see that rank fail rather than wait.
"""

from __future__ import annotations

import atexit
import sys
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch.distributed as dist

from ..core.distributed import Collectives
from ..offload.nvme import SwapFile

_PENDING: list[weakref.finalize] = []  # the release of every engine still alive
_HOOKED = False


def release(comms: list[Collectives], delayed: ThreadPoolExecutor | None, swap_file: SwapFile | None) -> None:
    """Make the engine's collectives refuse, close the NVMe swap file, and wait for the host update
    in flight and stop its thread. Not a collective. (The engine's own process group is left to
    `leave_group` at `engine.close()` and to the default group's end at exit: a garbage collection
    runs at a different moment on each rank, and a group destroyed on some ranks only would give
    the next locally synchronised group different names on different ranks.)"""
    for comm in comms:
        comm.close()
    if swap_file is not None:
        swap_file.close()
    if delayed is not None:
        delayed.shutdown(wait=True)


def leave_group(ref: Callable[[], dist.ProcessGroup | None] | None) -> None:
    """Destroy the process group `ref` (a weak reference) refers to, unless it is gone already:
    torch joins its worker threads now. Every rank must do it at the same point of its program."""
    group = ref() if ref is not None else None
    if group is not None:
        dist.destroy_process_group(group)


def release_before_teardown(finalizer: weakref.finalize) -> None:
    """Run `finalizer` (an engine's `release`) at interpreter exit if nothing ran it earlier, before
    the default gloo group is destroyed; see the module docstring."""
    global _HOOKED
    finalizer.atexit = False  # weakref's own exit hook knows nothing of uncaught exceptions
    _PENDING[:] = [pending for pending in _PENDING if pending.alive]
    _PENDING.append(finalizer)
    if not _HOOKED:
        atexit.register(_before_teardown)
        _HOOKED = True


def _ended_by_exception() -> bool:
    return any(getattr(sys, name, None) is not None for name in ("last_exc", "last_value"))


def _before_teardown() -> None:
    if _ended_by_exception():
        return
    for finalizer in _PENDING:
        finalizer()
    _PENDING.clear()
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "gloo":
        dist.destroy_process_group()
