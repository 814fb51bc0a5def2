"""FlatLayout arithmetic: every element lands in exactly one rank's shard, aligned and bucketed."""

from __future__ import annotations

import pytest
import torch

from hf_zero.core.layout import ALIGN, FlatLayout

SHAPES = [torch.Size(s) for s in [(7, 5), (3,), (130,), (40, 40), (1,), (9, 11, 2), (600,)]]
NAMES = [f"p{i}" for i in range(len(SHAPES))]


@pytest.mark.parametrize("num_shards", [1, 2, 3, 4])
@pytest.mark.parametrize("bucket_size", [1, 200, 1000, 10**9])
def test_every_element_is_owned_exactly_once(num_shards, bucket_size):
    layout = FlatLayout(NAMES, SHAPES, num_shards, bucket_size)
    owners = [torch.zeros(s.numel(), dtype=torch.int32) for s in SHAPES]
    for rank in range(num_shards):
        for span in layout.spans(rank):
            owners[span.slot][span.param_begin : span.param_begin + span.length] += 1
            assert span.shard_begin >= 0 and span.shard_begin + span.length <= layout.shard_numel
    assert all(bool((o == 1).all()) for o in owners)
    assert layout.numel == layout.shard_numel * num_shards


@pytest.mark.parametrize("num_shards", [1, 4])
def test_alignment_and_bucket_sizes(num_shards):
    layout = FlatLayout(NAMES, SHAPES, num_shards, bucket_size=1000)
    assert all(slot.offset % ALIGN == 0 for slot in layout.slots)
    for bucket in layout.buckets:
        assert bucket.size % (num_shards * ALIGN) == 0 and bucket.chunk * num_shards == bucket.size
        raw = sum(layout.slots[i].numel for i in bucket.slots)
        assert raw <= 1000 or len(bucket.slots) == 1  # only a parameter larger than a bucket stands alone
    # Buckets tile the flat buffer, and shard chunks tile the shard, in order.
    assert [b.start for b in layout.buckets] == [
        sum(x.size for x in layout.buckets[:i]) for i in range(len(layout.buckets))
    ]
    assert [b.shard_offset for b in layout.buckets] == [
        sum(x.chunk for x in layout.buckets[:i]) for i in range(len(layout.buckets))
    ]


def test_shards_reassemble_the_flat_buffer():
    num_shards = 3
    layout = FlatLayout(NAMES, SHAPES, num_shards, bucket_size=500)
    tensors = [torch.randn(s) for s in SHAPES]
    flat = torch.zeros(layout.numel)
    for index, tensor in enumerate(tensors):
        layout.param_view(flat, index).copy_(tensor)
    shards = [
        layout.shard_of(tensors, rank, torch.float32, torch.device("cpu")) for rank in range(num_shards)
    ]
    rebuilt = torch.zeros(layout.numel)
    for bucket in layout.buckets:
        for rank, shard in enumerate(shards):
            start = bucket.chunk_start(rank)
            rebuilt[start : start + bucket.chunk].copy_(layout.shard_chunk(shard, bucket))
    assert torch.equal(rebuilt, flat)
    for index, tensor in enumerate(tensors):
        assert torch.equal(layout.param_view(rebuilt, index), tensor)


def test_unsharded_layout_keeps_flat_coordinates():
    layout = FlatLayout(NAMES, SHAPES, 1, bucket_size=300)
    assert all(b.shard_offset == b.start for b in layout.buckets)
    assert all(
        span.shard_begin == layout.slots[span.slot].offset + span.param_begin for span in layout.spans(0)
    )


def test_names_and_shapes_must_pair_up():
    with pytest.raises(ValueError, match="one name per shape"):
        FlatLayout(["a"], SHAPES[:2], 1, 10)
