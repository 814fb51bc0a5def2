"""Short-lived device buffers (`DeviceOps.scratch`, `hf_zero/core/device.py`): on the CPU a pool
hands back the blocks recycled after use, zeroed, never keeping more blocks than were lent at once;
on a GPU (`--device cuda`) every buffer is torch's own, from its caching allocator."""

from __future__ import annotations

import gc

import torch

from hf_zero.core.device import DeviceOps


def test_a_recycled_buffer_comes_back_zeroed_in_the_same_memory(device):
    ops = DeviceOps.for_device(device)
    first = ops.scratch(1000, torch.float32)
    assert first.shape == (1000,) and not first.any()
    first.fill_(3.0)
    address = first.data_ptr()
    ops.recycle(first)
    second = ops.scratch(800, torch.float32)
    assert second.shape == (800,) and not second.any()
    reused = second.data_ptr() == address
    assert reused == (device.type == "cpu")
    assert ops.counts()["scratch_buffers"] == 2
    assert ops.counts()["scratch_allocations"] == (1 if device.type == "cpu" else 2)
    assert ops.scratch(10, torch.float32, zero=False).shape == (10,)


def test_the_pool_keeps_no_more_blocks_than_were_lent_at_once():
    ops = DeviceOps.for_device(torch.device("cpu"))
    for sizes in ([100, 300, 200], [300, 100, 200], [50, 400, 250]):
        lent = [ops.scratch(n, torch.float32) for n in sizes]
        assert all(not t.any() for t in lent)
        assert len({t.data_ptr() for t in lent}) == 3  # three buffers lent at once never share memory
        for t in lent:
            t.fill_(1.0)
            ops.recycle(t)
        assert len(ops._free) == 3  # a request no free block fitted replaced the largest of them
    # The last round: 50 took the 100 block (the smallest that fits); 400 replaced 300, 250 replaced 200.
    assert sorted(block.numel() for block in ops._free) == [100, 250, 400]
    # Another dtype has blocks of its own.
    half = ops.scratch(100, torch.bfloat16)
    assert half.dtype == torch.bfloat16 and len(ops._free) == 3
    ops.recycle(half)
    assert len(ops._free) == 4


def test_recycling_twice_or_a_foreign_tensor_changes_nothing():
    ops = DeviceOps.for_device(torch.device("cpu"))
    buffer = ops.scratch(64, torch.float32)
    ops.recycle(buffer)
    ops.recycle(buffer)
    assert len(ops._free) == 1
    ops.recycle(torch.zeros(64)[:32])  # a view, but not of a block of the pool
    ops.recycle(torch.zeros(64))
    assert len(ops._free) == 1
    a, b = ops.scratch(64, torch.float32), ops.scratch(64, torch.float32)
    assert a.data_ptr() != b.data_ptr()


def test_a_buffer_dropped_without_recycling_is_freed_as_usual():
    ops = DeviceOps.for_device(torch.device("cpu"))
    buffer = ops.scratch(1 << 16, torch.float32)
    assert len(ops._blocks) == 1
    del buffer
    gc.collect()
    assert len(ops._blocks) == 0 and not ops._free
