"""ZeroAccelerator on 2 gloo ranks (through torchrun): checkpoints, full weights, compile, world checks.

One launch per mode of `hf_zero.testing.accelerate_run` (start-up dominates on CPU); each test
checks one property of what it wrote.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from hf_zero import ZeroAccelerator
from hf_zero.integrations.accelerator import (
    MODEL_FILE,
    _pack,
    _unpack,
    shard_file_name,
    write_atomically,
)
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


def test_checkpoint_holds_full_fp32_weights_and_one_shard_per_rank(checkpoint_run):
    out, ranks = checkpoint_run
    checkpoints = out / "project" / "checkpoints"
    # Automatic naming with total_limit=2 rotated the first of three checkpoints out.
    assert sorted(path.name for path in checkpoints.iterdir()) == ["checkpoint_1", "checkpoint_2"]
    latest = checkpoints / "checkpoint_2"
    # Accelerate's own files stay; no model.safetensors of flat-buffer views, no rank-0-only
    # optimizer.bin, no temporary files.
    assert {path.name for path in latest.iterdir()} == {
        MODEL_FILE,
        shard_file_name(0, WORLD),
        shard_file_name(1, WORLD),
        "scheduler.bin",
        "custom_checkpoint_0.pkl",
        "random_states_0.pkl",
        "random_states_1.pkl",
    }
    saved = ranks[0]["resume"]["saved"]["weights"]
    weights = load_file(latest / MODEL_FILE)
    assert set(weights) == set(saved) - {"lm_head.weight"}  # tied to transformer.wte.weight
    for key, value in weights.items():
        assert value.dtype == torch.float32
        assert torch.equal(value, saved[key]), key

    shards = [load_file(latest / shard_file_name(rank, WORLD)) for rank in range(WORLD)]
    assert shards[0].keys() == shards[1].keys()
    assert any(not torch.equal(shards[0][key], shards[1][key]) for key in shards[0])
    masters = [sum(t.numel() for k, t in shard.items() if k.startswith("shard.masters")) for shard in shards]
    param_count = sum(p.numel() for p in build_model("gpt2").parameters())
    assert masters[0] == masters[1]
    assert param_count <= sum(masters) <= 1.02 * param_count  # each rank holds its half (plus padding)


def test_bf16_state_reloads_in_place(checkpoint_run):
    _, ranks = checkpoint_run
    run = ranks[0]["bf16"]
    assert run["after_load"] == run["after_save"]
    _assert_equal_weights(run["weights_after_load"], run["weights_after_save"])


def test_resume_with_another_number_of_processes_is_refused(checkpoint_run):
    _, ranks = checkpoint_run
    for results in ranks:
        message = results["resume"]["wrong_world_error"]
        assert message is not None
        assert "hf_zero_shard_rank00000_of_00004.safetensors" in message
        assert "not 2; resume with the number of processes it was saved with" in message


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
        ({"zero_config": {"offload_optimizer": "cpu"}}, "offloading"),
        ({"mixed_precision": "fp16"}, "fp16"),
    ],
)
def test_unavailable_features_are_refused_at_construction(monkeypatch, kwargs, match):
    def set_up_accelerate(self, *args, **kwargs):
        raise AssertionError("Accelerate was set up before the config was checked")

    monkeypatch.setattr(Accelerator, "__init__", set_up_accelerate)
    with pytest.raises(NotImplementedError, match=match):
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


def test_shard_layout_keeps_optimizer_state_exactly(tmp_path):
    shared = torch.arange(6.0)
    state = {
        "masters": [torch.ones(4)],
        "optimizer": {
            "state": {0: {"step": torch.tensor(3.0), "exp_avg": shared[:3], "exp_avg_sq": shared}},
            "param_groups": [{"betas": (0.9, 0.999), "lr": 1e-3, "foreach": None, "amsgrad": False}],
        },
    }
    tensors: dict[str, torch.Tensor] = {}
    layout = _pack(state, "shard", tensors)
    assert set(tensors) == {
        "shard.masters[0]",
        "shard.optimizer.state[0].step",
        "shard.optimizer.state[0].exp_avg",
        "shard.optimizer.state[0].exp_avg_sq",
    }
    path = tmp_path / "shard.safetensors"
    save_file(tensors, path)  # views of one storage were copied apart, as safetensors requires
    restored = _unpack(json.loads(json.dumps(layout)), load_file(path))
    assert restored["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]
    assert isinstance(restored["optimizer"]["param_groups"][0]["betas"], tuple)
    assert list(restored["optimizer"]["state"]) == [0]
    for key, value in state["optimizer"]["state"][0].items():
        assert torch.equal(restored["optimizer"]["state"][0][key], value), key
    with pytest.raises(TypeError, match=r"cannot store set at shard\.extra in an hf_zero shard file"):
        _pack({"extra": {1, 2}}, "shard", {})
