"""ZeroAccelerator on 2 gloo ranks (through torchrun): checkpoints, full weights, compile, world checks.

One launch per mode of `hf_zero.testing.accelerate_run` (start-up dominates on CPU); each test
checks one property of what it wrote.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from hf_zero import ZeroAccelerator
from hf_zero.checkpoint.format import MANIFEST, TRAINER_SUBFOLDER, rank_file_name
from hf_zero.saving import write_atomically
from hf_zero.testing.accelerate_run import SAVE_AFTER
from hf_zero.testing.launch import torchrun
from hf_zero.testing.tiny_models import build_model

WORLD = 2
MODULE = "hf_zero.testing.accelerate_run"


def _launch(mode: str, out: Path) -> list[dict]:
    torchrun(MODULE, WORLD, [mode, str(out)])
    return [torch.load(out / f"rank{rank}.pt") for rank in range(WORLD)]


@pytest.fixture(scope="module")
def checkpoint_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("accelerate_checkpoint")
    return out, _launch("checkpoint", out)


def _assert_equal_weights(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert torch.equal(got[key], value), key


# ---- save_state / load_state ------------------------------------------------------------------------


def test_resumed_run_continues_bit_identically(checkpoint_run):
    _, ranks = checkpoint_run
    run = ranks[0]["resume"]
    resumed_from = len(SAVE_AFTER)
    assert run["losses"][0] - min(run["losses"]) > 0.1  # the loss really moves on the Markov data
    # The resumed run started from other weights and another RNG state, and still sees the same
    # batches (RNG states), learning rates (scheduler) and weights (masters + optimizer shards).
    assert run["resumed_losses"] == run["losses"][resumed_from:]
    assert run["resumed_lrs"] == run["lrs"][resumed_from:]
    assert run["restored"] == {"step": run["saved"]["step"], "samples": run["saved"]["samples"]}
    _assert_equal_weights(run["resumed_weights"], run["weights"])
    assert any(not torch.equal(run["weights"][k], v) for k, v in run["saved"]["weights"].items())


def test_checkpoint_holds_an_hf_zero_checkpoint_with_one_file_per_rank(checkpoint_run):
    out, ranks = checkpoint_run
    checkpoints = out / "project" / "checkpoints"
    # Automatic naming with total_limit=2 rotated the first of three checkpoints out.
    assert sorted(path.name for path in checkpoints.iterdir()) == ["checkpoint_1", "checkpoint_2"]
    latest = checkpoints / "checkpoint_2"
    # Accelerate's own files stay; no model.safetensors of flat-buffer views, no rank-0-only
    # optimizer.bin, no temporary files.
    assert {path.name for path in latest.iterdir()} == {
        TRAINER_SUBFOLDER,
        "scheduler.bin",
        "custom_checkpoint_0.pkl",
        "random_states_0.pkl",
        "random_states_1.pkl",
    }
    state = latest / TRAINER_SUBFOLDER
    assert {path.name for path in state.iterdir()} == {
        MANIFEST,
        rank_file_name(0, WORLD),
        rank_file_name(1, WORLD),
    }
    saved = ranks[0]["resume"]["saved"]["weights"]
    shards = [load_file(state / rank_file_name(rank, WORLD)) for rank in range(WORLD)]
    # Each rank holds its own elements of every weight (the fp32 masters), and Adam's moments of them.
    for name, value in saved.items():
        if name == "lm_head.weight":  # tied to transformer.wte.weight, saved under that name
            assert all(name not in shard for shard in shards)
            continue
        pieces = [shard[name] for shard in shards if name in shard]
        assert all(piece.dtype == torch.float32 for piece in pieces)
        assert torch.equal(torch.cat(pieces), value.reshape(-1)), name
        assert all(f"{name}::exp_avg" in shard for shard in shards if name in shard)
    sizes = [sum(t.numel() for k, t in shard.items() if "::" not in k) for shard in shards]
    param_count = sum(p.numel() for p in build_model("gpt2").parameters())
    assert sum(sizes) == param_count and abs(sizes[0] - sizes[1]) < 0.02 * param_count


def test_bf16_state_reloads_in_place(checkpoint_run):
    _, ranks = checkpoint_run
    run = ranks[0]["bf16"]
    assert run["after_load"] == run["after_save"]
    _assert_equal_weights(run["weights_after_load"], run["weights_after_save"])


def test_load_state_at_another_stage_continues_the_curve(checkpoint_run):
    _, ranks = checkpoint_run
    run = ranks[0]["resume"]
    resumed_from = len(SAVE_AFTER)
    # Saved at stage 2, loaded at stage 3: same losses and weights up to fp32 reduction order.
    torch.testing.assert_close(run["stage3_losses"], run["losses"][resumed_from:], rtol=1e-6, atol=1e-6)
    for key, value in run["weights"].items():
        torch.testing.assert_close(run["stage3_weights"][key], value, rtol=0, atol=1e-5, msg=key)


# ---- full weights: get_state_dict, save_model -----------------------------------------------------


def test_get_state_dict_gives_fp32_masters_on_the_writing_rank_only(checkpoint_run):
    _, ranks = checkpoint_run
    run = ranks[0]["bf16"]
    assert run["model_dtype"] == "torch.bfloat16"
    assert run["unwrap_is_model"]
    state, masters = run["state_dict"], run["masters"]
    assert state.keys() == build_model("gpt2").state_dict().keys()
    _assert_equal_weights(state, masters)
    assert all(value.dtype == torch.float32 for value in state.values())
    assert state["lm_head.weight"] is state["transformer.wte.weight"]
    # The fp32 masters, not the bf16 weights the model computes with.
    assert any(not torch.equal(value, value.bfloat16().float()) for value in state.values())
    assert ranks[1]["bf16"]["state_dict"] == {}


@pytest.mark.parametrize("folder", ["save_model", "save_pretrained"])
def test_saved_model_loads_with_from_pretrained(checkpoint_run, folder):
    out, ranks = checkpoint_run
    masters = ranks[0]["bf16"]["masters"]
    assert all(
        value.dtype == torch.float32 for value in load_file(out / folder / "model.safetensors").values()
    )
    # save_pretrained records the dtype the model computes in (bf16) in config.json, so from_pretrained
    # needs dtype=float32 to keep the fp32 values; save_model's folder has the config as it was built.
    kwargs = {"dtype": torch.float32} if folder == "save_pretrained" else {}
    model = AutoModelForCausalLM.from_pretrained(out / folder, **kwargs)
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    loaded = model.state_dict()
    for key, value in masters.items():
        assert loaded[key].dtype == torch.float32
        assert torch.equal(loaded[key], value), key


# ---- compile, world size, early refusals ------------------------------------------------------------


def test_compiled_model_trains_to_the_same_weights(tmp_path):
    results = _launch("compile", tmp_path)[0]
    initial = build_model("gpt2").state_dict()
    # The whole model through TrainingArguments(torch_compile=True); by region through the plugin.
    for name, compiled_as in (("trainer", "whole"), ("regional", "regions")):
        assert results[f"{name}_compiled_as"] == compiled_as, name
        assert results[f"{name}_graphs"] > 0, name
        compiled, eager = results[f"{name}_compiled_weights"], results[f"{name}_eager_weights"]
        assert compiled.keys() == eager.keys()
        for key, value in eager.items():
            torch.testing.assert_close(compiled[key], value, rtol=1e-6, atol=1e-7, msg=f"{name} {key}")
        assert any(not torch.equal(value, initial[key]) for key, value in compiled.items())


def test_world_size_mismatch_is_refused(tmp_path, monkeypatch):
    # Without GPUs and without cpu=True, Accelerate takes each torchrun process for a world of one.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    for results in _launch("mismatch", tmp_path):
        message = results["error"]
        assert message is not None
        assert "Accelerate counts 1 process(es) but the launcher started 2" in message
        assert "pass cpu=True" in message


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {
                "zero_config": {
                    "offload_params": "nvme",
                    "offload_optimizer": "cpu",
                    "nvme_path": "/no/such/folder",
                    "stage": 3,
                }
            },
            "nvme_path='/no/such/folder' is not an existing folder",
        ),
    ],
)
def test_configs_that_cannot_run_here_are_refused_at_construction(monkeypatch, kwargs, match):
    def set_up_accelerate(self, *args, **kwargs):
        raise AssertionError("Accelerate was set up before the config was checked")

    monkeypatch.setattr(Accelerator, "__init__", set_up_accelerate)
    with pytest.raises(FileNotFoundError, match=match):
        ZeroAccelerator(cpu=True, **kwargs)


def test_write_atomically_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "weights.safetensors"
    write_atomically(target, lambda partial: save_file({"w": torch.ones(3)}, partial))

    def crash_halfway(partial: str) -> None:
        Path(partial).write_bytes(b"half a file")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomically(target, crash_halfway)
    assert torch.equal(load_file(target)["w"], torch.ones(3))
    assert [path.name for path in tmp_path.iterdir()] == ["weights.safetensors"]
