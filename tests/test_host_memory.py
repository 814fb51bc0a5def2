"""Host buffers of exactly the pages they need (`hf_zero.core.host_memory`): page-aligned, never
rounded up to a power of two, page-locked on a GPU (`--device cuda`), and unlocked before they are
unmapped once no tensor uses them."""

from __future__ import annotations

import gc

import pytest
import torch

import hf_zero
from hf_zero.core.device import DeviceOps
from hf_zero.core.host_memory import PAGE, mapped_buffer, mapped_length
from hf_zero.testing.tiny_models import build_model, make_samples


def _mapped(address: int) -> bool:
    """Whether `address` lies in one of this process's mappings."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            start, end = (int(bound, 16) for bound in line.split()[0].split("-"))
            if start <= address < end:
                return True
    return False


@pytest.mark.parametrize(
    ("numel", "dtype"),
    [
        (1, torch.float32),
        (PAGE // 4, torch.float32),
        (PAGE // 4 + 1, torch.float32),
        (3 * 2**20 + 5, torch.bfloat16),
    ],
)
def test_a_host_buffer_takes_whole_pages_from_a_page_boundary_and_no_more(device, numel, dtype):
    ops = DeviceOps.for_device(device)
    buffer = ops.host_empty(numel, dtype)
    assert buffer.shape == (numel,) and buffer.dtype == dtype and buffer.is_contiguous()
    assert buffer.data_ptr() % PAGE == 0
    # Whole pages: 6 MiB + 10 bytes of bf16 take 6 MiB + 4 KiB, where a power of two would be 8 MiB.
    assert ops.pinned_bytes == mapped_length(numel * dtype.itemsize) < numel * dtype.itemsize + PAGE
    assert buffer.is_pinned() == (device.type == "cuda")
    assert not ops.host_zeros(numel, dtype).any()  # fresh pages are zero, without a pass
    values = torch.arange(numel, device=device).to(dtype)
    buffer.copy_(values, non_blocking=True)
    back = torch.empty_like(values)
    back.copy_(buffer, non_blocking=True)
    ops.synchronize()
    assert torch.equal(back, values)


def test_the_pages_are_unlocked_then_unmapped_once_no_tensor_uses_them():
    calls = []
    buffer = mapped_buffer(
        5000,
        torch.float32,
        lock=lambda address, length: calls.append(("lock", address, length, _mapped(address))),
        unlock=lambda address: calls.append(("unlock", address, _mapped(address))),
    )
    address = buffer.data_ptr()
    assert calls == [("lock", address, 5 * PAGE, True)]
    view = buffer[100:200].view(torch.int32)
    del buffer
    gc.collect()
    assert len(calls) == 1 and _mapped(address)  # the view still uses the pages
    view.fill_(7)
    del view
    gc.collect()
    assert calls[1:] == [("unlock", address, True)]  # unlocked while still mapped
    assert not _mapped(address)


def test_a_failed_lock_unmaps_the_pages_and_raises():
    tried = []

    def refuse(address: int, length: int) -> None:
        tried.append(address)
        raise MemoryError("no page-locked memory left")

    with pytest.raises(MemoryError, match="no page-locked memory left"):
        mapped_buffer(PAGE, torch.uint8, lock=refuse, unlock=lambda address: None)
    gc.collect()
    assert tried and not _mapped(tried[0])
    assert mapped_buffer(0, torch.float32).numel() == 0


def test_offloaded_shards_and_staging_sit_in_mapped_pages_counted_as_pinned(tmp_path):
    """Stage 3 with the optimizer and the parameters offloaded to the CPU: the host masters, the
    16-bit shards and the staging buffers are host buffers of the device layer, and `pinned` counts
    their pages; the engine trains through them."""
    model = build_model("llama")
    config = {"stage": 3, "precision": "bf16", "offload_optimizer": "cpu", "offload_params": "cpu"}
    engine = hf_zero.initialize(model, torch.optim.AdamW(model.parameters(), lr=1e-2), config)
    samples = make_samples("llama", 4)
    losses = []
    for _ in range(3):
        loss = engine(**samples).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    host = [t for g in engine.groups for t in (g.master, g.shard16)] + [g.shard16 for g in engine.frozen]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in host if t is not None}
    assert storages and all(t.device.type == "cpu" for t in host if t is not None)
    assert all(start % PAGE == 0 for start in storages)
    pinned = engine.memory_breakdown()["pinned"]
    assert pinned % PAGE == 0
    assert sum(mapped_length(size) for size in storages.values()) + engine.staging.nbytes <= pinned
