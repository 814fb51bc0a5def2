"""NVMe optimizer offload (`offload_optimizer="nvme"`): fp32 masters and optimizer state in a swap
file, updated a segment at a time through a few aligned host buffers.

Each rank owns one swap file under `nvme_path` (`SwapFile`). It is created under a fresh name and
unlinked at once, so the space it holds returns to the disk however the process ends (Ctrl-C,
a crash, a kill) and no run ever finds, or reuses, another's file. Reads and writes are
`os.preadv`/`os.pwritev` calls in a small thread pool (they release the GIL), with `O_DIRECT`
where the filesystem accepts it, on 4 KiB-aligned buffers and offsets.

Between steps a segment's master and state tensors stay the same tensor objects (the optimizer's
state dict keys them) but are bound to a shared memory map of their region of the file, so
everything that reads or writes them outside the step (checkpoints, `state_dict`, loading
weights) works unchanged, through the page cache, and holds no memory of its own. The step binds
them to a pool buffer instead (`NvmeSwapper.walk`): while one segment is updated the next is read
ahead and the previous one written back, and host memory holds `nvme_buffer_count` buffers of
the largest segment whatever the model's size.

With `offload_params="nvme"` the 16-bit parameter shards live in the file too. A gathered unit's
shard goes up through a page-locked bounce buffer (`upload_params`); the stage-3 gatherer asks for
the shards of the units after the ones it prefetches, within its prefetch budget, to be read ahead
into other bounce buffers on the IO threads (`read_ahead`), so the disk reads overlap compute.
There are as many bounce buffers as the reads ahead and the upload under way hold at once. Shards change
only at the step, between passes: what a pass read ahead and left unused is dropped when the next
pass begins and at the step (`forget_read_ahead`).
"""

from __future__ import annotations

import errno
import functools
import mmap
import os
import shutil
import uuid
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..core.chained_optimizer import owner_of_group
from ..core.device import DeviceOps, Event
from ..core.flat_group import FlatParamGroup
from ..core.host_memory import mapped_buffer

ALIGN = 4096  # O_DIRECT wants buffers, offsets and lengths in multiples of the disk's block size
IO_BLOCK = 16 << 20  # bytes per preadv/pwritev call: big enough for the disk, small enough to spread
IO_THREADS = 4


class SwapFailedError(OSError):
    """An NVMe swap read or write failed; the swap file no longer holds a state to train on."""


def _padded(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def _gb(nbytes: int) -> str:
    return f"{nbytes / 1e9:.2f} GB"


def existing_folder(folder: str | os.PathLike) -> Path:
    """`folder` as a Path, or a clear error naming it when it is not an existing folder."""
    if not Path(folder).is_dir():
        raise FileNotFoundError(
            errno.ENOENT,
            f"nvme_path={str(folder)!r} is not an existing folder; create it (on a fast local disk) or point "
            "nvme_path at one",
        )
    return Path(folder)


def check_free_space(folder: str | os.PathLike, needed: int, ranks: int) -> None:
    """Refuse, before anything is written, a folder whose disk cannot hold `ranks` swap files of
    `needed` bytes each (the ranks of this machine share it)."""
    free = shutil.disk_usage(existing_folder(folder)).free
    if needed * ranks > free:
        raise OSError(
            errno.ENOSPC,
            f"NVMe offload needs {_gb(needed * ranks)} ({needed * ranks} bytes: {_gb(needed)} for each of "
            f"{ranks} rank(s) on this machine) under nvme_path={str(folder)!r}, but its disk has only "
            f"{_gb(free)} ({free} bytes) free; free space there, point nvme_path at a larger disk, or use "
            "offload_optimizer='cpu'",
        )


class SwapFile:
    """One rank's swap file: fresh, unlinked once open, grown region by region.

    `fd` is an ordinary descriptor (space reservation, memory maps); `io_fd` is the one reads and
    writes of whole aligned regions go through, opened with `O_DIRECT` where the filesystem takes
    it (`direct` says whether it did)."""

    def __init__(self, folder: str | os.PathLike, rank: int) -> None:
        folder = existing_folder(folder)
        self.path = folder / f".hf_zero-swap-{uuid.uuid4().hex[:12]}-rank{rank}"
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as error:
            raise OSError(
                error.errno,
                f"cannot create the NVMe swap file {self.path} ({error.strerror}); nvme_path must be a folder "
                "this process may write to",
            ) from error
        try:
            self.io_fd, self.direct = self._open_direct()
        finally:
            os.unlink(self.path)  # the open descriptors keep it alive; nothing outlives the process
        self.size = 0
        self._pool = ThreadPoolExecutor(IO_THREADS, thread_name_prefix="hf_zero-nvme")
        # Closed by `close`, or once nothing uses the file any more (the memory maps hold their own
        # descriptors, so tensors bound to them stay readable).
        self._closer = weakref.finalize(self, _close, self._pool, {self.fd, self.io_fd})

    def _open_direct(self) -> tuple[int, bool]:
        flag = getattr(os, "O_DIRECT", 0)
        if not flag:
            return self.fd, False
        try:
            fd = os.open(self.path, os.O_RDWR | flag)
        except OSError:
            return self.fd, False
        probe = mapped_buffer(ALIGN, torch.uint8)  # page-aligned, as O_DIRECT wants
        try:
            os.pwritev(fd, [memoryview(probe.numpy())], 0)  # some filesystems only refuse here
            os.ftruncate(self.fd, 0)
        except OSError:
            os.close(fd)
            return self.fd, False
        return fd, True

    def describe(self) -> str:
        return f"{self.path} (NVMe swap file, unlinked once open)"

    def close(self) -> None:
        """Finish the reads and writes under way, stop the IO threads and close the descriptors; the
        tensors bound to the file's memory maps stay readable, but no step can run any more."""
        self._closer()

    def reserve(self, nbytes: int) -> int:
        """Grow the file by `nbytes` (a multiple of `ALIGN`), reserving the blocks on disk so that
        later writes cannot run out of space; returns the new region's offset."""
        offset = self.size
        try:
            os.posix_fallocate(self.fd, offset, nbytes)
        except OSError as error:
            if error.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise SwapFailedError(
                    error.errno,
                    f"cannot reserve {_gb(nbytes)} more in {self.describe()}: {error.strerror}; "
                    f"{_gb(shutil.disk_usage(self.path.parent).free)} are free under {self.path.parent}",
                ) from error
            os.ftruncate(self.fd, offset + nbytes)  # a filesystem without reservations: sparse
        self.size = offset + nbytes
        return offset

    def map(self, offset: int, nbytes: int) -> mmap.mmap:
        return mmap.mmap(self.fd, nbytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=offset)

    def _transfer(self, write: bool, buffer: torch.Tensor, offset: int) -> list[Future]:
        view = memoryview(buffer.numpy())
        return [
            self._pool.submit(self._whole, write, view[start : start + IO_BLOCK], offset + start)
            for start in range(0, len(view), IO_BLOCK)
        ]

    def _whole(self, write: bool, view: memoryview, offset: int) -> None:
        done = 0
        try:
            while done < len(view):
                call = os.pwritev if write else os.preadv
                moved = call(self.io_fd, [view[done:]], offset + done)
                if moved == 0:
                    raise OSError(errno.EIO, "the file ended early")
                done += moved
        except OSError as error:
            what = "writing" if write else "reading"
            raise SwapFailedError(
                error.errno,
                f"{what} {len(view)} bytes at offset {offset} of {self.describe()} failed: "
                f"{error.strerror or error}",
            ) from error

    def run(self, work: Callable[[], None]) -> Future:
        """Run `work` on the IO threads."""
        return self._pool.submit(work)

    def read_into(self, buffer: torch.Tensor, offset: int) -> list[Future]:
        """Start reading `buffer.numel()` bytes at `offset` into the uint8 `buffer`."""
        return self._transfer(False, buffer, offset)

    def write_from(self, buffer: torch.Tensor, offset: int) -> list[Future]:
        """Start writing the uint8 `buffer` at `offset`."""
        return self._transfer(True, buffer, offset)


def _close(pool: ThreadPoolExecutor, descriptors: set[int]) -> None:
    pool.shutdown(wait=True)
    for fd in descriptors:
        os.close(fd)


def _bind(tensor: torch.Tensor, source: torch.Tensor) -> None:
    """Make `tensor` (the same object: the optimizer keys its state by it) a view of `source`."""
    with torch.no_grad():
        tensor.set_(source.untyped_storage(), source.storage_offset(), source.shape, source.stride())


@dataclass
class _Region:
    """Where one segment's master and optimizer state live in the file and in a pool buffer:
    fp32 slots `names` (master first), each padded to `ALIGN`, then (in buffers only) the
    gradient in fp32 and the updated weights in the compute dtype."""

    group: FlatParamGroup
    names: list[str]
    offset: int
    numel: int
    map: mmap.mmap
    slot_bytes: int = 0
    views: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def file_bytes(self) -> int:
        return self.slot_bytes * len(self.names)

    @property
    def buffer_bytes(self) -> int:
        return self.file_bytes + self.slot_bytes + _padded(self.numel * self.group.compute_dtype.itemsize)


@dataclass
class _ParamRegion:
    """A 16-bit parameter shard's region of the file, mapped."""

    map: mmap.mmap
    nbytes: int
    view: torch.Tensor | None = None

    def drop(self) -> None:
        """Forget the pages of a shard that was only read (they are clean: nothing is written)."""
        self.map.madvise(mmap.MADV_DONTNEED)


def _settle(mapped: mmap.mmap) -> None:
    """Write back pages changed through a map and drop them from this process."""
    mapped.flush()
    mapped.madvise(mmap.MADV_DONTNEED)


@dataclass
class _Resident:
    """A segment stepped through one pool buffer: its reads, then its writes, in flight."""

    region: _Region
    buffer: torch.Tensor
    reads: list[Future]
    writes: list[Future] = field(default_factory=list)
    uploaded: Event | None = None


def state_keys(optimizer: torch.optim.Optimizer, group: dict) -> list[str]:
    """The per-element optimizer state an NVMe-offloaded param group keeps (the fused kernels'
    optimizers only)."""
    optimizer = owner_of_group(optimizer, group)
    if type(optimizer) in (torch.optim.Adam, torch.optim.AdamW):
        return ["exp_avg", "exp_avg_sq"]
    if type(optimizer) is torch.optim.SGD:
        return ["momentum_buffer"] if group["momentum"] != 0 else []
    raise ValueError(
        f"offload_optimizer='nvme' updates Adam, AdamW and SGD (hf_zero's fused kernels), not "
        f"{type(optimizer).__name__}; use one of those, or offload_optimizer='cpu', which steps any "
        "elementwise optimizer"
    )


class NvmeSwapper:
    """The swap file of one rank and the pool of host buffers segments are stepped through."""

    def __init__(
        self, folder: str, rank: int, optimizer: torch.optim.Optimizer, buffer_count: int, ops: DeviceOps
    ) -> None:
        self.file = SwapFile(folder, rank)
        self.optimizer = optimizer
        self.buffer_count = buffer_count
        self.ops = ops
        self.regions: dict[int, _Region] = {}  # id(group) -> region
        self.param_regions: dict[int, _ParamRegion] = {}  # id(group) -> its 16-bit shard's region
        self.error: BaseException | None = None
        self._buffers: list[torch.Tensor] = []
        self._free: list[torch.Tensor] = []
        self._writing: deque[_Resident] = deque()
        # offload_params: page-locked buffers the shards go up through (all of them, and the free
        # ones, each with its last upload), and the shards read ahead into the others:
        # id(group) -> (buffer, the read).
        self._bounce_pool: list[torch.Tensor] = []
        self._bounces: deque[tuple[torch.Tensor, Event | None]] = deque()
        self._ahead: dict[int, tuple[torch.Tensor, Future]] = {}
        self.read_ahead_hits = 0  # uploads whose shard was already read ahead

    @property
    def direct(self) -> bool:
        return self.file.direct

    def adopt(self, group: FlatParamGroup, names: Sequence[str]) -> None:
        """Move `group`'s master into the file and bind it there; `names` are the optimizer state
        slots to keep beside it (created by the first step)."""
        numel = group.master.numel()
        if numel == 0:
            return
        slot_bytes = _padded(numel * 4)
        names = ["master", *names]
        offset = self.file.reserve(slot_bytes * len(names))
        region = _Region(
            group, names, offset, numel, self.file.map(offset, slot_bytes * len(names)), slot_bytes
        )
        for index, name in enumerate(names):
            region.views[name] = torch.frombuffer(
                region.map, dtype=torch.float32, count=numel, offset=index * slot_bytes
            )
        region.views["master"].copy_(group.master.data)
        _settle(region.map)
        _bind(group.master, region.views["master"])
        self.regions[id(group)] = region

    def adopt_params(self, group: FlatParamGroup) -> None:
        """`offload_params="nvme"`: move `group`'s 16-bit shard into the file and bind it to its map.

        The shard is read through the page cache when its unit is gathered (`upload_params`) and
        its pages dropped again; the step's new weights reach the file when `settle_params` runs
        after it."""
        shard = group.shard16
        nbytes = shard.numel() * shard.element_size()
        if nbytes == 0:
            return
        size = _padded(nbytes)
        offset = self.file.reserve(size)
        region = _ParamRegion(self.file.map(offset, size), size)
        view = torch.frombuffer(region.map, dtype=shard.dtype, count=shard.numel())
        view.copy_(shard)
        _settle(region.map)
        _bind(shard, view)
        region.view = view
        group.upload = functools.partial(self.upload_params, group)
        self.param_regions[id(group)] = region

    def upload_params(self, group: FlatParamGroup) -> torch.Tensor:
        """`group`'s 16-bit shard, from the file to a new device tensor, without synchronising the
        device: a copy from the map (pageable memory) would make the host wait for every queued
        kernel first, once per unit gathered. The shard is read into a page-locked bounce buffer
        (its pages then dropped) and copied up asynchronously; bounce buffers take turns, and
        reusing one waits only for its own last upload. A shard read ahead (`read_ahead`) is taken
        from its buffer once that read is done."""
        region = self.param_regions[id(group)]
        shard = region.view
        ahead = self._ahead.pop(id(group), None)
        if ahead is not None:
            buffer, read = ahead
            read.result()
            self.read_ahead_hits += 1
        else:
            buffer, uploaded = self._free_bounce()
            if uploaded is not None:
                uploaded.synchronize()
            self._stage(buffer, region)
        staged = buffer[: shard.numel() * shard.element_size()].view(shard.dtype)
        on_device = torch.empty(shard.shape, dtype=shard.dtype, device=self.ops.device)
        on_device.copy_(staged, non_blocking=True)
        self._bounces.append((buffer, self.ops.record()))
        return on_device

    def read_ahead(self, group: FlatParamGroup) -> None:
        """Start reading `group`'s 16-bit shard into a bounce buffer on the IO threads, so that the
        disk read overlaps the units computing before it; a no-op for a group without a shard in
        the file or one already read ahead. With no bounce buffer free, one more is made: the
        gatherer bounds what it reads ahead by its prefetch budget. It calls this for the units
        after the ones it prefetches, within one pass: the shards do not change before their
        upload (`forget_read_ahead` drops what a pass left unused)."""
        region = self.param_regions.get(id(group))
        if region is None or id(group) in self._ahead:
            return
        buffer, uploaded = self._free_bounce()
        wait = uploaded.wait_later() if uploaded is not None else None

        def read() -> None:
            if wait is not None:
                wait()  # the buffer's last upload has left it
            self._stage(buffer, region)

        self._ahead[id(group)] = (buffer, self.file.run(read))

    def forget_read_ahead(self) -> None:
        """Drop the shards read ahead and not used (a pass ended; the step may change them next),
        once their reads are done, and give their buffers back."""
        while self._ahead:
            _, (buffer, read) = self._ahead.popitem()
            read.result()
            self._bounces.append((buffer, None))

    def _free_bounce(self) -> tuple[torch.Tensor, Event | None]:
        """A bounce buffer no read ahead holds, with its last upload; one more is made if none is
        free (uploads give theirs back at once, so there are at most one more than the gatherer
        reads ahead)."""
        if not self._bounces:
            self._add_bounce()
        return self._bounces.popleft()

    def _add_bounce(self) -> None:
        """One more bounce buffer, of the largest shard's size, free and never uploaded from."""
        buffer = self.ops.host_empty(max(r.nbytes for r in self.param_regions.values()), torch.uint8)
        self._bounce_pool.append(buffer)
        self._bounces.append((buffer, None))

    @staticmethod
    def _stage(buffer: torch.Tensor, region: _ParamRegion) -> None:
        """Copy a shard from its map into `buffer` and drop its pages."""
        shard = region.view
        buffer[: shard.numel() * shard.element_size()].view(shard.dtype).copy_(shard)
        region.drop()

    def settle_params(self) -> None:
        """Write the 16-bit shards the step changed to the file and drop their pages."""
        self.forget_read_ahead()  # nothing read before the step may be uploaded after it
        for region in self.param_regions.values():
            _settle(region.map)

    @property
    def file_bytes(self) -> int:
        return sum(region.file_bytes for region in self.regions.values()) + sum(
            region.nbytes for region in self.param_regions.values()
        )

    @property
    def host_bytes(self) -> int:
        """The host memory the step's buffers take (allocated at the first step), and the bounce
        buffers of parameter shards (from the first gather)."""
        largest = max((region.buffer_bytes for region in self.regions.values()), default=0)
        return largest * self.buffer_count + sum(buffer.numel() for buffer in self._bounce_pool)

    def check_usable(self) -> None:
        if self.error is not None:
            raise SwapFailedError(
                getattr(self.error, "errno", None) or errno.EIO,
                f"NVMe offload failed earlier ({self.error}), so the optimizer state in the swap file may be "
                "partly written: restart from the last checkpoint",
            )

    def walk(self, segments: Sequence[tuple[int, FlatParamGroup]]) -> Iterator[int]:
        """Yield the index of each segment of `segments` the file holds, in the file's order, while
        its master and state are bound to a pool buffer and its `host_grad`/`host_copy` lie there
        too; reads run ahead, writes behind. Whatever stops the walk early, an error of its own or
        one the caller throws in at the yield (its work on the segment failed), is recorded:
        the file may then hold a half-written step (`check_usable`)."""
        self.check_usable()
        # Front to back through the file, as the segments were adopted.
        todo = sorted(
            ((g, group) for g, group in segments if id(group) in self.regions),
            key=lambda item: self.regions[id(item[1])].offset,
        )
        try:
            self._allocate()
            loaded: deque[_Resident] = deque()
            ahead = 0
            for g, _ in todo:
                while ahead < len(todo) and (
                    not loaded or (len(loaded) < self.buffer_count - 1 and self._free)
                ):
                    loaded.append(self._swap_in(self.regions[id(todo[ahead][1])]))
                    ahead += 1
                resident = loaded.popleft()
                self._enter(resident)
                yield g
                self._swap_out(resident)
            while self._writing:
                self._release(self._writing.popleft())
        except GeneratorExit:
            # Closed (not thrown into) with a segment still bound to a pool buffer, its step unfinished.
            self.error = SwapFailedError(errno.ECANCELED, "the step stopped with a segment swapped in")
            raise
        except BaseException as error:
            self.error = error
            raise

    # ---- the buffer cycle ------------------------------------------------------------------------

    def _allocate(self) -> None:
        size = max((region.buffer_bytes for region in self.regions.values()), default=0)
        if self._buffers and self._buffers[0].numel() >= size:
            return
        # Page-aligned (`host_empty`), as O_DIRECT wants.
        self._buffers = [self.ops.host_empty(size, torch.uint8) for _ in range(self.buffer_count)]
        self._free = list(self._buffers)

    def _acquire(self) -> torch.Tensor:
        if not self._free:
            self._release(self._writing.popleft())
        return self._free.pop()

    def _swap_in(self, region: _Region) -> _Resident:
        buffer = self._acquire()
        _settle(region.map)  # what was written through the map reaches the disk first
        reads = self.file.read_into(buffer[: region.file_bytes], region.offset)
        return _Resident(region, buffer, reads)

    def _slot(self, resident: _Resident, index: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        region = resident.region
        start = index * region.slot_bytes
        return resident.buffer[start : start + region.numel * dtype.itemsize].view(dtype)

    def _enter(self, resident: _Resident) -> None:
        for future in resident.reads:
            future.result()
        region, group = resident.region, resident.region.group
        tensors = self._tensors(region)
        for index, name in enumerate(region.names):
            tensor = tensors.get(name)
            if tensor is None:
                continue
            slot = self._slot(resident, index)
            if tensor.data_ptr() != region.views[name].data_ptr():
                slot.copy_(tensor.detach().reshape(-1))  # replaced in memory (loaded state): it wins
            _bind(tensor, slot)
        group.host_grad = self._slot(resident, len(region.names))
        group.host_copy = self._slot(resident, len(region.names) + 1, group.compute_dtype)

    def _swap_out(self, resident: _Resident) -> None:
        region, group = resident.region, resident.region.group
        tensors = self._tensors(region)
        for index, name in enumerate(region.names):
            tensor = tensors.get(name)
            slot = self._slot(resident, index)
            if tensor is not None and tensor.data_ptr() != slot.data_ptr():
                slot.copy_(tensor.detach().reshape(-1))  # state the step created
                _bind(tensor, slot)
        resident.uploaded = self.ops.record()
        group.host_grad = group.host_copy = None
        resident.writes = self.file.write_from(resident.buffer[: region.file_bytes], region.offset)
        self._writing.append(resident)

    def _release(self, resident: _Resident) -> None:
        for future in resident.writes:
            future.result()
        if resident.uploaded is not None:
            resident.uploaded.synchronize()  # the new weights left the buffer
            resident.uploaded = None
        region = resident.region
        for name, tensor in self._tensors(region).items():
            _bind(tensor, region.views[name])
        self._free.append(resident.buffer)

    def _tensors(self, region: _Region) -> dict[str, torch.Tensor]:
        """The live tensors of the region's slots: the master, and the optimizer state it has."""
        master = region.group.master
        state = self._optimizer_state(master)
        tensors = {"master": master}
        for name in region.names[1:]:
            value = state.get(name)
            if torch.is_tensor(value) and value.numel() == region.numel:
                tensors[name] = value
        return tensors

    def _optimizer_state(self, master: torch.Tensor) -> dict:
        return self.optimizer.state.get(master, {})
