"""Host buffers of exactly the pages they need, page-locked on a GPU without rounding.

torch's page-locked allocator (`pin_memory=True`) rounds every block up to a power of two, so a
shard-sized buffer can cost up to twice its size, on exactly the runs (offload) that are short of
host memory. `mapped_buffer` maps its own anonymous pages instead: page-aligned (as O_DIRECT
wants), the size rounded up to a page only, and given back to the system as soon as no tensor uses
them. On a GPU the device layer locks the pages with `cudaHostRegister` after mapping them and
unlocks them before they are unmapped (`hf_zero.core.device`); on the CPU nothing is locked, and
the same mapping runs, so the path runs in CI.
"""

from __future__ import annotations

import ctypes
import mmap
import weakref
from collections.abc import Callable

import torch

PAGE = mmap.PAGESIZE

# lock(address, length) / unlock(address): make the pages page-locked and ordinary again.
Lock = Callable[[int, int], None]
Unlock = Callable[[int], None]


def mapped_length(nbytes: int) -> int:
    """The bytes a `mapped_buffer` of `nbytes` maps: `nbytes` rounded up to whole pages."""
    return -(-nbytes // PAGE) * PAGE


def mapped_buffer(
    numel: int, dtype: torch.dtype, lock: Lock | None = None, unlock: Unlock | None = None
) -> torch.Tensor:
    """A 1-D host tensor of `numel` `dtype` elements in anonymous pages of its own, starting on a page
    boundary; `lock` runs on the pages once mapped, `unlock` once no tensor uses them, before they
    are unmapped. Raises MemoryError, naming the size, when the system has no such memory."""
    if numel == 0:
        return torch.empty(0, dtype=dtype)
    length = mapped_length(numel * dtype.itemsize)
    try:
        pages = mmap.mmap(-1, length, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except OSError as error:
        raise MemoryError(
            f"could not map {length / 2**20:.1f} MiB of host memory for a host buffer ({error.strerror}); "
            "free host memory, or offload less (offload_optimizer / offload_params)"
        ) from error
    # The ctypes array holds the mapping open while it lives (and the mapping cannot be closed
    # under it); every tensor made from it holds the array. Its finalizer runs when the last of
    # them goes, before the array lets go of the mapping: unlock first, then unmap.
    holder = (ctypes.c_uint8 * length).from_buffer(pages)
    address = ctypes.addressof(holder)
    if lock is not None:
        try:
            lock(address, length)
        except BaseException:
            del holder
            pages.close()
            raise
    if unlock is not None:
        # Not at interpreter exit: the device may be gone by then, and the system takes the pages.
        weakref.finalize(holder, unlock, address).atexit = False
    return torch.frombuffer(holder, dtype=dtype, count=numel)
