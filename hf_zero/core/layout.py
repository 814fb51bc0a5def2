"""Where every parameter lives in a flat buffer, and which part of that buffer each rank owns.

Parameters of one param group are laid end to end, each starting on an `ALIGN`-element boundary
(so 16-bit weight views stay friendly to matrix kernels). Consecutive parameters are grouped
into buckets of about `bucket_size` elements; each bucket is padded to a multiple of
`num_shards * ALIGN` and split into `num_shards` equal chunks. Rank r owns chunk r of every
bucket, and keeps those chunks end to end in its shard: one contiguous tensor per group, so the
optimizer runs one launch over it, while each bucket can be reduce-scattered or all-gathered on
its own (that is what lets gradient reduction overlap backward).

Everything here is arithmetic on sizes; no tensors are allocated except where asked to copy.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

ALIGN = 64


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


@dataclass(frozen=True)
class ParamSlot:
    """One parameter's place in the flat buffer."""

    name: str
    shape: torch.Size
    offset: int
    bucket: int

    @property
    def numel(self) -> int:
        return self.shape.numel()


@dataclass(frozen=True)
class Bucket:
    """A run of whole parameters, padded and split into one equal chunk per rank."""

    index: int
    start: int
    size: int
    chunk: int
    shard_offset: int
    slots: tuple[int, ...]

    def chunk_start(self, rank: int) -> int:
        """Flat-buffer offset of the chunk `rank` owns."""
        return self.start + rank * self.chunk


@dataclass(frozen=True)
class Span:
    """The part of one parameter that falls in one rank's shard, in all three coordinate systems."""

    slot: int
    param_begin: int
    shard_begin: int
    flat_begin: int
    length: int


@dataclass(frozen=True)
class Run:
    """A contiguous piece of one rank's shard and where the same elements sit in the flat buffer:
    the unit the optimizer kernel is launched over (one per bucket, or the whole group unsharded)."""

    shard_start: int
    flat_start: int
    length: int


class FlatLayout:
    """The flat layout of one param group's parameters, sharded `num_shards` ways."""

    def __init__(self, names: Sequence[str], shapes: Sequence[torch.Size], num_shards: int, bucket_size: int):
        if len(names) != len(shapes):
            raise ValueError("FlatLayout needs one name per shape")
        self.num_shards = num_shards
        slots: list[ParamSlot] = []
        buckets: list[Bucket] = []
        members: list[int] = []
        bucket_start = offset = shard_offset = 0

        def close_bucket() -> None:
            nonlocal bucket_start, offset, shard_offset
            size = _round_up(offset - bucket_start, num_shards * ALIGN)
            chunk = size // num_shards
            buckets.append(Bucket(len(buckets), bucket_start, size, chunk, shard_offset, tuple(members)))
            shard_offset += chunk
            bucket_start = offset = bucket_start + size
            members.clear()

        for name, shape in zip(names, shapes, strict=True):
            numel = torch.Size(shape).numel()
            if members and offset + numel - bucket_start > bucket_size:
                close_bucket()
            members.append(len(slots))
            slots.append(ParamSlot(name, torch.Size(shape), offset, len(buckets)))
            offset = _round_up(offset + numel, ALIGN)
        if members:
            close_bucket()

        self.slots: tuple[ParamSlot, ...] = tuple(slots)
        self.buckets: tuple[Bucket, ...] = tuple(buckets)
        self.numel = bucket_start
        self.shard_numel = shard_offset

    def spans(self, rank: int) -> Iterator[Span]:
        """The pieces of each parameter that land in `rank`'s shard."""
        for bucket in self.buckets:
            lo = bucket.chunk_start(rank)
            hi = lo + bucket.chunk
            for index in bucket.slots:
                slot = self.slots[index]
                begin, end = max(lo, slot.offset), min(hi, slot.offset + slot.numel)
                if begin < end:
                    yield Span(
                        index, begin - slot.offset, bucket.shard_offset + begin - lo, begin, end - begin
                    )

    def runs(self, rank: int) -> list[Run]:
        """Rank `rank`'s shard as contiguous runs of the flat buffer: the whole buffer when unsharded,
        else its chunk of each bucket."""
        if self.num_shards == 1:
            return [Run(0, 0, self.numel)] if self.numel else []
        return [Run(b.shard_offset, b.chunk_start(rank), b.chunk) for b in self.buckets]

    def shard_of(
        self, tensors: Sequence[torch.Tensor], rank: int, dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        """Rank `rank`'s shard of the flat concatenation of `tensors` (one per slot); padding is zero."""

        def read(slot: int, begin: int, length: int) -> torch.Tensor:
            return tensors[slot].detach().reshape(-1)[begin : begin + length]

        return self.shards_of(read, rank, [dtype], device)[0]

    def shards_of(
        self,
        read: Callable[[int, int, int], torch.Tensor],
        rank: int,
        dtypes: Sequence[torch.dtype],
        device: torch.device | Sequence[torch.device],
        into: Sequence[torch.Tensor | None] = (),
    ) -> list[torch.Tensor]:
        """Rank `rank`'s shard in each of `dtypes`, of the values `read(slot, begin, length)` gives
        (elements `begin .. begin + length` of slot `slot`'s flattened parameter). Each span is read
        once, however many dtypes are asked for; padding is zero. `device` is one device for all, or
        one per dtype; `into` gives, per dtype, a zeroed tensor of the shard's size to fill instead of allocating one (None: allocate)."""
        devices = [device] * len(dtypes) if isinstance(device, torch.device) else list(device)
        given = list(into) or [None] * len(dtypes)
        shards = [
            torch.zeros(self.shard_numel, dtype=dtype, device=where) if out is None else out
            for dtype, where, out in zip(dtypes, devices, given, strict=True)
        ]
        for shard, dtype in zip(shards, dtypes, strict=True):
            if shard.numel() != self.shard_numel or shard.dtype != dtype:
                raise ValueError(f"shards_of: a {dtype} shard of {self.shard_numel} elements was needed")
        for span in self.spans(rank):
            values = read(span.slot, span.param_begin, span.length)
            for shard in shards:
                shard[span.shard_begin : span.shard_begin + span.length].copy_(values)
        return shards

    def param_view(self, flat: torch.Tensor, index: int) -> torch.Tensor:
        """Slot `index`'s parameter as a view into a full flat buffer."""
        slot = self.slots[index]
        return flat[slot.offset : slot.offset + slot.numel].view(slot.shape)

    def bucket_view(self, flat: torch.Tensor, bucket: Bucket) -> torch.Tensor:
        """A bucket's region of a full flat buffer."""
        return flat[bucket.start : bucket.start + bucket.size]

    def shard_chunk(self, shard: torch.Tensor, bucket: Bucket) -> torch.Tensor:
        """A bucket's chunk inside a shard tensor."""
        return shard[bucket.shard_offset : bucket.shard_offset + bucket.chunk]
