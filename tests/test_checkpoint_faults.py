"""Damaged, foreign and interrupted checkpoints: each gives an error naming the file or parameter,
changes nothing, and leaves earlier checkpoints loadable."""

from __future__ import annotations

import json
import signal

import pytest
import torch
from transformers import GPT2LMHeadModel

import hf_zero
from hf_zero.checkpoint import CheckpointError
from hf_zero.checkpoint.format import MANIFEST, rank_file_name, sha256_of
from hf_zero.testing.checkpoint_faults import KILL_POINTS, killed_save, trained_engine
from hf_zero.testing.launch import torchrun
from hf_zero.testing.tiny_models import build_model

SHARD = rank_file_name(0, 1)


def _fingerprint(folder) -> dict[str, str]:
    return {path.name: sha256_of(path) for path in sorted(folder.iterdir())}


def _fresh_engine(name: str = "gpt2", optimizer=torch.optim.AdamW) -> hf_zero.ZeroEngine:
    model = build_model(name)
    return hf_zero.initialize(model, optimizer(model.parameters(), lr=1e-2), {"stage": 1})


def _header(path) -> bytes:
    """The JSON header of a safetensors file."""
    data = path.read_bytes()
    return data[8 : 8 + int.from_bytes(data[:8], "little")]


def _damage(folder, how: str) -> None:
    shard = folder / SHARD
    if how == "truncated":
        shard.write_bytes(shard.read_bytes()[:-100])
    elif how == "flipped":
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0x01
        shard.write_bytes(bytes(data))
    elif how == "missing":
        shard.unlink()
    elif how == "manifest":
        (folder / MANIFEST).write_text('{"format": "hf_zero.checkpoint", ')


@pytest.mark.parametrize(
    "how, message",
    [
        ("truncated", f"{SHARD} holds .* bytes but the manifest recorded .*: the file is truncated"),
        ("flipped", f"{SHARD} does not match the SHA-256 its manifest recorded"),
        ("missing", f"lacks {SHARD}, which its manifest lists"),
        ("manifest", f"{MANIFEST} is not valid JSON"),
    ],
)
def test_a_damaged_checkpoint_is_refused_naming_the_file_and_nothing_changes(tmp_path, how, message):
    engine = trained_engine(steps=1)
    engine.save_checkpoint(tmp_path / "earlier")
    earlier = _fingerprint(tmp_path / "earlier")
    engine.save_checkpoint(tmp_path / "damaged")
    _damage(tmp_path / "damaged", how)
    fresh = _fresh_engine()
    before = fresh.full_state_dict()
    with pytest.raises(CheckpointError, match=message):
        fresh.load_checkpoint(tmp_path / "damaged")
    assert all(torch.equal(value, before[name]) for name, value in fresh.full_state_dict().items())
    assert fresh.optimizer.state == {} and fresh.global_steps == 0
    assert _fingerprint(tmp_path / "earlier") == earlier
    fresh.load_checkpoint(tmp_path / "earlier")
    assert fresh.global_steps == 1


def test_a_checkpoint_of_another_model_or_optimizer_is_refused_naming_what_differs(tmp_path):
    trained_engine(steps=1).save_checkpoint(tmp_path / "gpt2")
    llama = _fresh_engine("llama")
    with pytest.raises(CheckpointError, match=r"the checkpoint has no tensor 'model\.embed_tokens\.weight'"):
        llama.load_checkpoint(tmp_path / "gpt2")
    config = build_model("gpt2").config
    config.vocab_size = 300
    wider = GPT2LMHeadModel(config)
    engine = hf_zero.initialize(wider, torch.optim.AdamW(wider.parameters()), {"stage": 1})
    with pytest.raises(CheckpointError, match=r"'transformer.wte.weight' has shape \(300, 64\) in the model"):
        engine.load_checkpoint(tmp_path / "gpt2")
    sgd = _fresh_engine(optimizer=torch.optim.SGD)
    with pytest.raises(
        CheckpointError, match=r"holds the state of a torch\.optim\.adamw\.AdamW but the engine runs"
    ):
        sgd.load_checkpoint(tmp_path / "gpt2")


def test_an_unwritable_or_occupied_target_is_refused_and_nothing_is_lost(tmp_path):
    engine = trained_engine(steps=1)
    engine.save_checkpoint(tmp_path / "earlier")
    earlier = _fingerprint(tmp_path / "earlier")
    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(OSError, match="cannot prepare the checkpoint"):
        engine.save_checkpoint(tmp_path / "a_file" / "checkpoint")  # its parent cannot be a folder
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(OSError, match="exists and is not an hf_zero checkpoint"):
        engine.save_checkpoint(tmp_path / "notes")
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"
    assert _fingerprint(tmp_path / "earlier") == earlier
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "earlier", "notes"]  # no leftovers


@pytest.mark.parametrize("point", KILL_POINTS)
def test_a_save_killed_at_any_point_leaves_the_earlier_checkpoint_loadable(tmp_path, point):
    first = trained_engine(steps=1)
    first.save_checkpoint(tmp_path / "earlier")
    earlier = first.full_state_dict()
    # The swap points only exist when a save replaces an earlier checkpoint in the same folder.
    replacing = point in ("before_swap", "after_swap", "after_manifest")
    target = tmp_path / ("earlier" if replacing else "new")
    log = tmp_path / "kill.log"
    exit_code = killed_save(point, target, tmp_path / "w.pt", log)
    assert exit_code == -signal.SIGKILL, (exit_code, log.exists() and log.read_text()[-3000:])
    killed = torch.load(tmp_path / "w.pt")
    fresh = _fresh_engine()
    fresh.load_checkpoint(tmp_path / "earlier")
    expected = killed if point == "after_swap" else earlier  # swapped in: the new one is complete
    for name, value in fresh.full_state_dict().items():
        assert torch.equal(value, expected[name]), name
    if not replacing:
        with pytest.raises(FileNotFoundError, match="does not exist"):
            _fresh_engine().load_checkpoint(target)
    # Leftover temporary folders do not look like checkpoints and do not stop the next save.
    assert all(
        p.name.startswith(".") for p in tmp_path.iterdir() if p.is_dir() and p.name not in ("earlier",)
    )
    first.save_checkpoint(target)
    _fresh_engine().load_checkpoint(target)


def test_two_ranks_agree_on_a_damaged_file_and_on_a_failed_save(tmp_path):
    torchrun("hf_zero.testing.checkpoint_faults", 2, ["ranks", str(tmp_path)])
    seen = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    for rank_seen in seen:
        # Rank 1's file is damaged; rank 0 hashed it or not, both ranks raise the same error.
        assert rank_file_name(1, 2) in rank_seen["damaged"] and "SHA-256" in rank_seen["damaged"]
        assert "No space left on device" in rank_seen["failed_save"]
        # The asynchronous save was in flight during the step, finished into its folder and holds
        # the weights of before the step; a failed one raises on both ranks when waited for.
        assert rank_seen["async_in_flight"] and rank_seen["async_folder"] == str(tmp_path / "async")
        assert rank_seen["async_holds_its_step"] and rank_seen["async_step_moved"]
        assert "No space left on device" in rank_seen["failed_async"]
        assert rank_seen["leftovers"] == []
        assert rank_seen["earlier_unchanged"] and rank_seen["earlier_loads"]
    assert seen[0]["damaged"] == seen[1]["damaged"]
    assert seen[0]["failed_async"] == seen[1]["failed_async"]
    # Each rank's snapshot holds what it writes: its half of the masters and of both Adam moments.
    manifest = json.loads((tmp_path / "async" / MANIFEST).read_text())
    for rank in range(2):
        header = json.loads(_header(tmp_path / "async" / rank_file_name(rank, 2)))
        data = sum(
            end - begin
            for key, v in header.items()
            if key != "__metadata__"
            for begin, end in [v["data_offsets"]]
        )
        assert seen[rank]["async_snapshot_bytes"] == data > 0
    assert manifest["files"][rank_file_name(1, 2)]["sha256"] == sha256_of(
        tmp_path / "async" / rank_file_name(1, 2)
    )
