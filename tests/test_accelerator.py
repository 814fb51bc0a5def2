"""ZeroAccelerator on 2 gloo ranks (through torchrun): checkpoints, full weights, compile, world checks;
and, in this process, where `prepare` places the model.

One launch of `hf_zero.testing.accelerate_run` runs its three modes one after another (start-up
dominates on CPU; the modes give the same results as launched alone); each test checks one property
of what its mode wrote. The placement decision is a pure function, so its GPU cases run here on
torch.device objects; `prepare`'s use of it runs with the engine recorded, not built.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import hf_zero
from hf_zero import ZeroAccelerator
from hf_zero.checkpoint.format import MANIFEST, TRAINER_SUBFOLDER, rank_file_name
from hf_zero.hub.saving import write_atomically
from hf_zero.integrations import accelerator as accelerator_module
from hf_zero.integrations.placement import decide_placement
from hf_zero.testing.accelerate_run import SAVE_AFTER
from hf_zero.testing.launch import torchrun
from hf_zero.testing.tiny_models import build_model

WORLD = 2
MODULE = "hf_zero.testing.accelerate_run"


# `mismatch` first: as in a user's script, its Accelerator meets no process group yet.
MODES = ("mismatch", "checkpoint", "compile")


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """Every mode in one launch: `run(mode)` gives the mode's folder and its per-rank results. A
    mode that wrote no results re-raises the launch's error, with the ranks' output; the modes that
    finished before it are still checked."""
    out = tmp_path_factory.mktemp("accelerate")
    try:
        # Without GPUs and without cpu=True, Accelerate takes each torchrun process for a world of
        # one (the mismatch mode); the other modes pass cpu=True.
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("CUDA_VISIBLE_DEVICES", "")
            torchrun(MODULE, WORLD, [str(out), *MODES])
        failed = None
    except RuntimeError as error:
        failed = error

    def run(mode: str) -> tuple[Path, list[dict]]:
        files = [out / mode / f"rank{rank}.pt" for rank in range(WORLD)]
        if failed is not None and not all(file.exists() for file in files):
            raise failed
        return out / mode, [torch.load(file) for file in files]

    return run


@pytest.fixture(scope="module")
def checkpoint_run(launched):
    return launched("checkpoint")


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


def test_compiled_model_trains_to_the_same_weights(launched):
    results = launched("compile")[1][0]
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


def test_world_size_mismatch_is_refused(launched):
    for results in launched("mismatch")[1]:
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


# ---- where prepare places the model -----------------------------------------------------------------

CPU, META = torch.device("cpu"), torch.device("meta")


def gpu(index: int) -> torch.device:
    return torch.device("cuda", index)


# (case, decide_placement arguments, the device decided or the error raised, the warning or None)
PLACEMENTS = [
    ("cpu-only machine", dict(target=CPU, model_devices=[CPU]), CPU, None),
    (
        "cpu-only machine, weights on disk",
        dict(target=CPU, model_devices=[META, CPU], pending=True),
        CPU,
        None,
    ),
    ("one GPU", dict(target=gpu(0), model_devices=[CPU], cuda_available=True), gpu(0), None),
    (
        "4 GPUs, local rank 3",
        dict(target=gpu(3), model_devices=[CPU], cuda_available=True, num_processes=4),
        gpu(3),
        None,
    ),
    (
        "model already on its GPU, placement off",
        dict(
            target=gpu(1),
            model_devices=[gpu(1)],
            device_placement=False,
            cuda_available=True,
            num_processes=2,
        ),
        gpu(1),
        None,
    ),
    (
        "model on another process's GPU",
        dict(target=gpu(0), model_devices=[gpu(1)], cuda_available=True, num_processes=2),
        ValueError(
            "the model has tensors on cuda:1, but this process trains on cuda:0 .* build the model on the CPU"
        ),
        None,
    ),
    (
        "model on another process's GPU, placement off",
        dict(target=gpu(0), model_devices=[gpu(1)], device_placement=False, cuda_available=True),
        ValueError("tensors on cuda:1, but this process trains on cuda:0"),
        None,
    ),
    (
        "weights on disk (meta), local rank 2",
        dict(target=gpu(2), model_devices=[META, CPU], pending=True, cuda_available=True, num_processes=4),
        gpu(2),
        None,
    ),
    (
        "weights on disk, placement off",
        dict(
            target=gpu(2),
            model_devices=[META, CPU],
            pending=True,
            device_placement=False,
            cuda_available=True,
        ),
        gpu(2),
        None,
    ),
    (
        "cpu=True on a GPU machine",
        dict(target=CPU, model_devices=[CPU], cuda_available=True, cpu=True),
        CPU,
        None,
    ),
    (
        "cpu=True on a GPU machine, weights on disk",
        dict(target=CPU, model_devices=[META], pending=True, cuda_available=True, cpu=True),
        CPU,
        None,
    ),
    (
        "cpu=True, model on a GPU",
        dict(target=CPU, model_devices=[gpu(0)], cuda_available=True, cpu=True),
        CPU,
        None,
    ),
    (
        "cpu=True, model on a GPU, placement off",
        dict(target=CPU, model_devices=[gpu(0)], device_placement=False, cuda_available=True, cpu=True),
        ValueError("the model is on cuda:0 and device_placement=False .* Accelerate's device is cpu"),
        None,
    ),
    (
        "Accelerate chose the CPU on a GPU machine",
        dict(target=CPU, model_devices=[CPU], cuda_available=True),
        CPU,
        "CUDA is available but Accelerate chose the CPU .* pass cpu=True",
    ),
    (
        "mixed devices: CPU and its GPU",
        dict(target=gpu(0), model_devices=[CPU, gpu(0)], cuda_available=True),
        gpu(0),
        None,
    ),
    (
        "mixed devices: CPU and another GPU",
        dict(target=gpu(0), model_devices=[gpu(0), CPU, gpu(1)], cuda_available=True, num_processes=2),
        ValueError("the model has tensors on cuda:1, but this process trains on cuda:0"),
        None,
    ),
    (
        "mixed devices, placement off",
        dict(target=gpu(0), model_devices=[CPU, gpu(0)], device_placement=False, cuda_available=True),
        ValueError("the model is on cpu, cuda:0 .* several devices .* leave device_placement on"),
        None,
    ),
    (
        "placement off, model on the CPU, one GPU",
        dict(target=gpu(0), model_devices=[CPU], device_placement=False, cuda_available=True),
        CPU,
        "the model stays on the CPU .* leave device_placement on .* to train on cuda:0",
    ),
    (
        "placement off, model on the CPU, 2 GPUs",
        dict(
            target=gpu(1), model_devices=[CPU], device_placement=False, cuda_available=True, num_processes=2
        ),
        ValueError("the model is on cpu .* 2 processes communicate over NCCL .* leave device_placement on"),
        None,
    ),
    (
        "a device hf_zero does not compute on",
        dict(target=torch.device("mps"), model_devices=[CPU]),
        ValueError("Accelerate chose mps .* CUDA GPUs or the CPU; pass cpu=True"),
        None,
    ),
]


@pytest.mark.parametrize(
    ("arguments", "decided", "warning"), [c[1:] for c in PLACEMENTS], ids=[c[0] for c in PLACEMENTS]
)
def test_placement_decisions(arguments, decided, warning):
    if isinstance(decided, Exception):
        with pytest.raises(type(decided), match=str(decided)):
            decide_placement(**arguments)
        return
    placement = decide_placement(**arguments)
    assert placement.device == decided
    if warning is None:
        assert placement.warning is None
    else:
        assert re.search(warning, placement.warning), placement.warning


class _Recorded(Exception):
    """Raised by the stand-in engine: what prepare would have built is recorded, nothing is built."""


@pytest.fixture
def on_gpu0(monkeypatch):
    """A `ZeroAccelerator` in this process that takes itself for GPU 0 of a CUDA machine, and the
    devices `prepare` asks the engine for (the stand-in engine records them instead of building)."""
    accelerator = ZeroAccelerator(zero_config={"stage": 2})
    requested: list[torch.device] = []

    def record(model, optimizer, config, device=None):
        requested.append(device)
        raise _Recorded

    monkeypatch.setattr(accelerator_module, "ZeroEngine", record)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(ZeroAccelerator, "device", property(lambda self: gpu(0)))
    yield accelerator, requested
    AcceleratorState._reset_state(reset_partial_state=True)


def _model_and_optimizer():
    model = build_model("gpt2")
    return model, torch.optim.AdamW(model.parameters())


@pytest.mark.parametrize("where", ["prepare", "accelerator"])
def test_prepare_shards_on_the_accelerator_device_or_where_placement_off_leaves_the_model(on_gpu0, where):
    accelerator, requested = on_gpu0
    with pytest.raises(_Recorded):
        accelerator.prepare(*_model_and_optimizer())
    assert requested == [gpu(0)]
    # Accelerate's device_placement, per object in prepare or for the whole accelerator.
    placement = {"device_placement": [True, False]} if where == "prepare" else {}
    accelerator.device_placement = where == "prepare"
    optimizer, model = reversed(_model_and_optimizer())
    with pytest.warns(UserWarning, match="the model stays on the CPU"), pytest.raises(_Recorded):
        accelerator.prepare(optimizer, model, **placement)
    assert requested == [gpu(0), CPU]


def test_prepare_reads_weights_still_on_disk_onto_the_accelerator_device(on_gpu0, tmp_path):
    accelerator, requested = on_gpu0
    build_model("llama").save_pretrained(tmp_path)
    model = hf_zero.from_pretrained(AutoModelForCausalLM, tmp_path, {"stage": 3})
    # Pending weights land on the accelerator's device even with placement off, without a warning.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(_Recorded):
            accelerator.prepare(model, torch.optim.AdamW(model.parameters()), device_placement=[False, False])
    assert requested == [gpu(0)]
