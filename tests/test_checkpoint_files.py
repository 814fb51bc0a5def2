"""The rank files a checkpoint writes: plain safetensors streamed from the tensors with their
checksum taken on the way, and the host snapshot an asynchronous save writes them from."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from hf_zero.checkpoint.format import rank_file_name, read_manifest, sha256_of
from hf_zero.core.safetensors_file import write_safetensors
from hf_zero.testing.checkpoint_faults import trained_engine


def test_a_file_written_from_the_tensors_reads_back_with_safetensors_and_its_checksum(tmp_path):
    generator = torch.Generator().manual_seed(0)
    tensors = {
        "master": torch.randn(1000, generator=generator),
        "master::exp_avg": torch.randn(1000, generator=generator),
        "frozen": torch.randn(3, 5, generator=generator).to(torch.bfloat16),
        "half": torch.randn(7, generator=generator).half(),
        "position_ids": torch.arange(11),
        "mask": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0),
    }
    path = tmp_path / "rank.safetensors"
    size, digest = write_safetensors(path, tensors, {"format": "pt"})
    assert size == path.stat().st_size and digest == sha256_of(path)
    loaded = load_file(path)
    assert loaded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name
    with safe_open(path, "pt") as file:
        assert file.metadata() == {"format": "pt"}
    with pytest.raises(ValueError, match="'strided' must be a contiguous CPU tensor"):
        write_safetensors(tmp_path / "bad.safetensors", {"strided": torch.ones(4, 4).t()}, {})


def test_asynchronous_saves_reuse_one_snapshot_and_write_what_a_synchronous_save_writes(tmp_path):
    engine = trained_engine(steps=2)
    engine.save_checkpoint(tmp_path / "sync")
    engine.save_checkpoint(tmp_path / "first", asynchronous=True)
    buffers = dict(engine.background_saves.snapshot.buffers)
    engine.save_checkpoint(tmp_path / "second", asynchronous=True)  # waits for the first one
    assert engine.background_saves.in_flight
    assert engine.wait_for_checkpoint() == tmp_path / "second"
    snapshot = engine.background_saves.snapshot
    assert snapshot.buffers.keys() == buffers.keys()
    assert all(snapshot.buffers[key] is buffer for key, buffer in buffers.items())  # no new memory
    name = rank_file_name(0, 1)
    assert snapshot.nbytes == sum(
        t.numel() * t.element_size() for t in load_file(tmp_path / "sync" / name).values()
    )
    # Same step, same state: the same bytes as the synchronous save.
    for folder in ("first", "second"):
        assert read_manifest(tmp_path / folder)["files"] == read_manifest(tmp_path / "sync")["files"]
    engine.close()
    assert snapshot.nbytes == 0
