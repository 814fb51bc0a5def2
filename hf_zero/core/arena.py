"""One allocation carved into views, and the inverse: views that sit end to end merged back into one.

Stage 3 keeps a shard per (unit, param group, dtype) segment: dozens of masters, gradients,
16-bit shards and optimizer moments. Carved from one allocation per purpose, in param-group order,
the segments of one param group sit end to end in every one of those tensors, so an elementwise
kernel (the optimizer step, the gradient statistics) runs one launch over all of them instead of
one per segment (`merge_adjacent`). One allocation also avoids the caching host allocator's
rounding of each page-locked block up to a power of two.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def nbytes(tensor: torch.Tensor) -> int:
    """The bytes of `tensor`'s own elements (not of the whole storage a view may be cut from)."""
    return tensor.numel() * tensor.element_size()


def carve(
    sizes: Sequence[int],
    dtype: torch.dtype,
    device: torch.device,
    allocate=None,
) -> list[torch.Tensor]:
    """Zeroed 1-D views of the given sizes, end to end in one allocation. `allocate(numel, dtype)`
    makes that allocation (default: `torch.zeros` on `device`), e.g. a page-locked host buffer."""
    total = sum(sizes)
    if allocate is None:
        buffer = torch.zeros(total, dtype=dtype, device=device)
    else:
        buffer = allocate(total, dtype)
        buffer.zero_()
    # Tensors on the shared storage, not autograd views of `buffer`: a view would keep the whole
    # allocation alive through its `_base` after the tensor is re-pointed elsewhere (NVMe offload
    # binds state to its swap buffers), where these free it once none of them uses it.
    views, start = [], 0
    for size in sizes:
        views.append(_on_storage(buffer, start, size))
        start += size
    return views


def carve_ordered(
    sizes: Sequence[int],
    dtypes: Sequence[torch.dtype],
    order: Sequence,
    device: torch.device,
    allocate=None,
) -> list[torch.Tensor]:
    """Zeroed views for items of the given sizes and dtypes, one allocation per dtype, each laid
    out in the order of the items' `order` keys (ties: item order); returned in item order."""
    views: list[torch.Tensor | None] = [None] * len(sizes)
    for dtype in dict.fromkeys(dtypes):
        items = sorted((i for i, d in enumerate(dtypes) if d == dtype), key=lambda i: (order[i], i))
        for i, view in zip(items, carve([sizes[i] for i in items], dtype, device, allocate), strict=True):
            views[i] = view
    return views


def segment_order(optimizer_group: int | None, dtype: torch.dtype) -> tuple[int, str]:
    """Where a segment's views go in the arenas: by param group (frozen segments first), then by
    dtype, so the segments of one param group and dtype sit end to end in every arena."""
    return (-1 if optimizer_group is None else optimizer_group, str(dtype))


def _follows(before: torch.Tensor, after: torch.Tensor) -> bool:
    """Whether `after` starts where `before` ends, in the same storage (both contiguous)."""
    return (
        before.dtype == after.dtype
        and before.device == after.device
        and before.is_contiguous()
        and after.is_contiguous()
        and before.untyped_storage().data_ptr() == after.untyped_storage().data_ptr()
        and before.storage_offset() + before.numel() == after.storage_offset()
    )


def _on_storage(tensor: torch.Tensor, start: int, numel: int) -> torch.Tensor:
    """A 1-D tensor of `numel` elements of `tensor`'s storage, `start` elements after `tensor`'s own
    first one (sharing the storage, not an autograd view of `tensor`)."""
    return torch.empty(0, dtype=tensor.dtype, device=tensor.device).set_(
        tensor.untyped_storage(), tensor.storage_offset() + start, (numel,), (1,)
    )


def merge_adjacent(rows: Sequence[tuple[torch.Tensor | None, ...]]) -> list[tuple[torch.Tensor | None, ...]]:
    """Merge consecutive rows whose every column continues the previous row's in memory.

    Each row is a tuple of flat tensors of one length (or None in a column that is None in every
    row merged with it), e.g. (master, gradient, moment, moment, 16-bit copy) of one piece of a
    shard; a merged row views the same memory as the rows it replaces, so an elementwise operation
    over it is the same as over each of them.
    """
    merged: list[tuple[torch.Tensor | None, ...]] = []
    lengths: list[int] = []
    for row in rows:
        length = next((t.numel() for t in row if t is not None), 0)
        if merged:
            last = merged[-1]
            if all(
                (a is None and b is None) or (a is not None and b is not None and _follows(a, b))
                for a, b in zip(last, row, strict=True)
            ):
                lengths[-1] += length
                merged[-1] = tuple(None if a is None else _on_storage(a, 0, lengths[-1]) for a in last)
                continue
        merged.append(tuple(t.reshape(-1) if t is not None else None for t in row))
        lengths.append(length)
    return merged
