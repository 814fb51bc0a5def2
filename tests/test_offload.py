"""Optimizer offload (`offload_optimizer="cpu"`, and `"nvme"` into swap files in a temporary folder):
fp32 masters and optimizer state off the device train exactly like the same stage without offload,
on 2 gloo ranks.

Each offloaded job (`hf_zero.testing.step_checks`) runs beside the same job without offload; on a
machine without a GPU both update on the CPU with the same operations, so losses and weights must
be identical, not merely close.
"""

from __future__ import annotations

import json

import pytest
import torch

import hf_zero
from hf_zero.testing.cases import Case
from hf_zero.testing.launch import torchrun
from hf_zero.testing.tiny_models import build_model, make_samples, slice_samples
from hf_zero.testing.unsharded import run_unsharded

STEPS = 6
PAIRS = {
    "s0_clip": {"stage": 0, "precision": "fp32", "clipping": 1.0},
    "s1_acc2_clip": {"stage": 1, "precision": "fp32", "accumulation": 2, "clipping": 1.0},
    "s2_acc2_clip": {"stage": 2, "precision": "fp32", "accumulation": 2, "clipping": 1.0},
    "s3_clip": {"stage": 3, "precision": "fp32", "clipping": 1.0},
    # One unit prefetched at a time (each variant too): with the shards in the swap file, the reader
    # reads the unit after it ahead.
    "s3_bf16_acc2": {"stage": 3, "precision": "bf16", "accumulation": 2, "config": {"prefetch_bytes": 1}},
    "s2_sgd": {"stage": 2, "precision": "fp32", "optimizer": "sgd"},
    "s1_rmsprop": {"stage": 1, "precision": "fp32", "optimizer": "rmsprop", "clipping": 1.0},
    # fp16 with an overflow injected on rank 1 at steps 2 and 3: skipped on both ranks, host side too.
    "s2_fp16_overflow": {"stage": 2, "precision": "fp16", "overflow_at": {"2": 1, "3": 1}},
}
# The NVMe swap takes the fused kernels' optimizers (Adam/AdamW, SGD); two buffers for the stage-3
# run, so that segments wait for each other's writes.
NVME = {
    "s1_acc2_clip": {},
    "s2_acc2_clip": {},
    "s3_clip": {"nvme_buffer_count": 2},
    "s3_bf16_acc2": {},
    "s2_sgd": {},
    "s2_fp16_overflow": {},
}

# offload_params="cpu" (stage 3): the 16-bit shards on the host as well, uploaded when gathered.
PARAMS = {
    "s3_clip": {"offload_optimizer": "cpu", "offload_params": "cpu"},
    "s3_bf16_acc2": {"offload_optimizer": "nvme", "offload_params": "nvme"},
}
# offload_overlap="delayed": the host update of step t runs while step t+1 computes.
DELAYED = {
    "s2_delayed_acc2_clip": {"stage": 2, "precision": "fp32", "accumulation": 2, "clipping": 1.0},
    "s3_delayed": {"stage": 3, "precision": "fp32"},
}


# CPU offload streams each shard through two staging buffers: small ones split the shard (and runs,
# across bucket padding) into many chunks.
CHUNKED = {"s1_acc2_clip", "s2_acc2_clip", "s3_clip", "s3_bf16_acc2", "s2_fp16_overflow", "s2_sgd"}


def _jobs(swap: str) -> list[dict]:
    jobs = [
        {
            "name": name,
            "steps": STEPS,
            **job,
            "config": {"offload_optimizer": "cpu", "offload_overlap": "delayed"},
        }
        for name, job in DELAYED.items()
    ]
    for name, job in PAIRS.items():
        jobs.append({"name": name, "steps": STEPS, **job})
        config = {"offload_optimizer": "cpu"} | ({"offload_chunk_size": 1000} if name in CHUNKED else {})
        shared = job.get("config", {})
        jobs.append({"name": f"{name}_offload", "steps": STEPS, **job, "config": {**shared, **config}})
        if name in NVME:
            config = {**shared, "offload_optimizer": "nvme", "nvme_path": swap, **NVME[name]}
            jobs.append({"name": f"{name}_nvme", "steps": STEPS, **job, "config": config})
        if name in PARAMS:
            config = {**shared, "nvme_path": swap, **PARAMS[name]}
            jobs.append({"name": f"{name}_params", "steps": STEPS, **job, "config": config})
    return jobs


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("offload")
    (out / "swap").mkdir()
    jobs = _jobs(str(out / "swap"))
    (out / "jobs.json").write_text(json.dumps(jobs))
    torchrun("hf_zero.testing.step_checks", 2, [str(out / "jobs.json"), str(out)])
    return {
        job["name"]: [torch.load(out / f"{job['name']}.rank{r}.pt", weights_only=False) for r in range(2)]
        for job in jobs
    }


@pytest.mark.parametrize(
    "name,kind",
    [(name, "offload") for name in PAIRS]
    + [(name, "nvme") for name in NVME]
    + [(name, "params") for name in PARAMS],
)
def test_offloaded_training_is_identical_to_training_on_the_device(runs, name, kind):
    plain, offloaded = runs[name], runs[f"{name}_{kind}"]
    initial = build_model("gpt2").state_dict()
    moved = sum((v.float() - initial[k].float()).abs().sum().item() for k, v in plain[0]["weights"].items())
    assert moved > 0.1  # training moved the weights
    # Below stage 3 NVMe offload keeps a segment per unit where the device spans the units with
    # one: the squared gradient norm is summed in another order, so the clip factor may differ in
    # its last bit. Everything else is bit-identical.
    same_layout = kind != "nvme" or PAIRS[name]["stage"] == 3
    if same_layout or not PAIRS[name].get("clipping"):
        assert offloaded[0]["losses"] == plain[0]["losses"]
        assert offloaded[0]["norms"] == plain[0]["norms"]
        assert offloaded[0]["weights"].keys() == plain[0]["weights"].keys()
        for key, value in plain[0]["weights"].items():
            assert torch.equal(offloaded[0]["weights"][key], value), key
    else:
        torch.testing.assert_close(offloaded[0]["losses"], plain[0]["losses"], rtol=1e-6, atol=0)
        torch.testing.assert_close(offloaded[0]["norms"], plain[0]["norms"], rtol=1e-6, atol=0)
        # (Adam turns a last-bit difference of a near-zero gradient into a visible one: compared
        # relative to how far training moved the weights; measured: 2e-5, from the order the norm is summed in.)
        assert _relative_error(offloaded[0]["weights"], plain[0]["weights"]) < 5e-5
    for rank in range(2):
        assert [s["skipped"] for s in offloaded[rank]["steps"]] == [
            s["skipped"] for s in plain[rank]["steps"]
        ]
        memory, device_memory = offloaded[rank]["memory"], plain[rank]["memory"]
        assert memory["masters"] == memory["optimizer_state"] == 0 and device_memory["offloaded"] == 0
        masters = device_memory["masters"]
        if PAIRS[name]["stage"] == 3 and PAIRS[name]["precision"] == "fp32":
            masters = device_memory["weights"]  # on the device each rank's shard is its own master
        state = masters + device_memory["optimizer_state"]
        if kind == "params":
            # Only gathered units and gradients stay on the device; the shards went to the host
            # (or with the masters and optimizer state into the swap file).
            off_device = memory["offloaded"] + memory.get("nvme", 0)
            assert memory["weights"] == 0 and off_device > state + device_memory["weights"]
            assert memory["peak_gathered"] == device_memory["peak_gathered"] > 0
            continue
        if same_layout:
            assert memory["weights"] == device_memory["weights"]
        else:  # the same weights, padded to 64 elements per segment and bucket
            assert 0 <= memory["weights"] - device_memory["weights"] <= 0.01 * device_memory["weights"]
        if kind == "offload":
            # Masters and optimizer state left the device; the host holds them plus two staging
            # buffer pairs (a gradient and a 16-bit or fp32 copy) of at most one chunk each.
            assert memory["offloaded"] > state
            if name in CHUNKED:
                assert memory["offloaded"] - state <= 2 * 1000 * (4 + 4)
        else:
            # In the swap file (each slot padded to 4 KiB); the host holds the step's buffers.
            assert state <= memory["nvme"] < state + 4096 * 3 * 16
            assert memory["offloaded"] > 0


@pytest.mark.parametrize("name", list(DELAYED))
def test_the_delayed_update_trains_as_if_each_update_came_one_step_late(runs, name):
    job = DELAYED[name]
    case = Case(
        model="gpt2",
        stage=0,
        accumulation=job.get("accumulation", 1),
        clipping=job.get("clipping", 0.0),
        steps=STEPS,
        micro_batch=2,
    )
    late, on_time = run_unsharded(case, 2, delayed=True), run_unsharded(case, 2)
    got = runs[name][0]
    # Step 0 computes with the initial weights either way; from step 1 on the delayed run lags.
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(late["losses"]), rtol=1e-5, atol=0)
    lag = max(abs(a - b) / b for a, b in zip(got["losses"], on_time["losses"], strict=True))
    assert lag > 1e-3  # and that is not rounding: the on-time run differs by far more
    # The final masters hold every update, the last one included: compared relative to how far
    # training moved them (Adam turns fp32 reduction-order noise in tiny gradients into ~1e-5).
    assert _relative_error(got["weights"], late["weights"]) < 1e-4
    assert _relative_error(got["weights"], on_time["weights"]) > 1e-2


def _relative_error(got: dict, want: dict) -> float:
    initial = build_model("gpt2").state_dict()
    diff = torch.cat([(got[key] - value).flatten() for key, value in want.items()])
    moved = torch.cat([(value - initial[key]).flatten() for key, value in want.items()])
    return (diff.norm() / moved.norm()).item()


@pytest.mark.parametrize("kind", ["offload", "nvme"])
def test_the_overflowing_steps_were_skipped_on_the_host_too(runs, kind):
    for result in runs[f"s2_fp16_overflow_{kind}"]:
        assert [s["skipped"] for s in result["steps"]] == [False, False, True, True, False, False]
        assert all(result["steps"][step]["identical"] for step in (2, 3))
        assert result["optimizer_steps"] == [4.0]


@pytest.mark.parametrize("offload", ["cpu", "nvme", "params", "nvme_params"])
def test_an_offloaded_checkpoint_resumes_without_offload_and_back(tmp_path, offload):
    batch = slice_samples(make_samples("gpt2", 4), 0, 4)

    def engine(offload: str):
        model = build_model("gpt2")
        config = {"stage": 2, "offload_optimizer": offload, "nvme_path": str(tmp_path)}
        if offload == "params":  # stage 3 with everything on the host, to and from stage 2 on the device
            config.update(stage=3, offload_optimizer="cpu", offload_params="cpu")
        if offload == "nvme_params":  # and with everything in the swap file
            config.update(stage=3, offload_optimizer="nvme", offload_params="nvme", prefetch_bytes=1)
        return hf_zero.initialize(model, torch.optim.AdamW(model.parameters(), lr=1e-3), config)

    trained = engine(offload)
    for _ in range(2):
        trained.backward(trained(**batch).loss)
        trained.step()
    trained.save_checkpoint(tmp_path / "offloaded")
    on_device = engine("none")
    on_device.load_checkpoint(tmp_path / "offloaded")
    back = engine(offload)
    on_device.save_checkpoint(tmp_path / "on_device")
    back.load_checkpoint(tmp_path / "on_device")
    want = trained.full_state_dict()
    for other in (on_device, back):
        got = other.full_state_dict()
        assert all(torch.equal(got[k], v) for k, v in want.items())
    # And all three continue identically.
    losses = []
    for other in (trained, on_device, back):
        other.backward(other(**batch).loss)
        other.step()
        losses.append(other(**batch).loss.item())
    assert losses[0] == losses[1] == losses[2]


def test_the_delayed_update_lands_before_evaluating_saving_and_loading(tmp_path):
    samples = make_samples("gpt2", 12)

    def engine(overlap: str):
        model = build_model("gpt2")
        config = {"stage": 1, "offload_optimizer": "cpu", "offload_overlap": overlap}
        return hf_zero.initialize(model, torch.optim.AdamW(model.parameters(), lr=1e-2), config)

    delayed = engine("delayed")
    for step in range(3):
        delayed.backward(delayed(**slice_samples(samples, 4 * step, 4)).loss)
        delayed.step()
    # The model still computes with the weights before the last update; evaluation gets all of them.
    delayed.eval()
    with torch.no_grad():
        loss = delayed(**slice_samples(samples, 0, 4)).loss.item()
    evaluated = build_model("gpt2")
    evaluated.load_state_dict(delayed.full_state_dict())
    assert loss == evaluated(**slice_samples(samples, 0, 4)).loss.item()
    delayed.train()
    delayed.save_checkpoint(tmp_path / "checkpoint")
    exact = engine("exact")
    exact.load_checkpoint(tmp_path / "checkpoint")
    # Resumed with the exact update, the run goes on from the same weights and state.
    losses = []
    for other in (delayed, exact):
        other.backward(other(**slice_samples(samples, 0, 4)).loss)
        other.step()
        losses.append(other(**slice_samples(samples, 0, 4)).loss.item())
    assert losses[0] != losses[1]  # the delayed run has not applied its fourth update yet...
    delayed.finish_delayed_update()
    with torch.no_grad():
        assert delayed(**slice_samples(samples, 0, 4)).loss.item() == losses[1]  # ...now it has


def test_parameter_offload_reads_a_pretrained_model_into_host_shards_frozen_weights_too(tmp_path):
    """Stage 3 with `offload_params="cpu"` (and `"nvme"`) straight from a `save_pretrained` folder: the
    weights go from the file to the host shards or the swap file (the device gets only gathered
    units), frozen ones included, and training equals the same run with the shards on the device."""
    from transformers import AutoModelForCausalLM

    build_model("gpt2").save_pretrained(tmp_path / "pretrained")
    samples = make_samples("gpt2", 12)
    runs = []
    for offload_params in ("none", "cpu", "nvme"):
        config = {
            "stage": 3,
            "precision": "bf16",
            "offload_optimizer": "cpu",
            "offload_params": offload_params,
            "nvme_path": str(tmp_path),
        }
        model = hf_zero.from_pretrained(AutoModelForCausalLM, tmp_path / "pretrained", config)
        model.transformer.wte.weight.requires_grad_(False)  # a frozen segment of its own
        trainable = [p for p in model.parameters() if p.requires_grad]
        engine = hf_zero.initialize(model, torch.optim.AdamW(trainable, lr=1e-2), config)
        frozen = [group for group in engine.frozen if group.params]
        assert frozen and all(g.shard16.device.type == "cpu" for g in frozen)
        losses = []
        for step in range(3):
            loss = engine(**slice_samples(samples, 4 * step, 4)).loss
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        runs.append((losses, engine.full_state_dict(), engine.memory_breakdown()))
    (on_device, device_state, device_memory), *offloaded_runs = runs
    assert on_device[-1] < on_device[0]
    for offloaded, state, memory in offloaded_runs:
        assert offloaded == on_device
        assert all(torch.equal(state[key], value) for key, value in device_state.items())
        assert memory["weights"] == 0 < device_memory["weights"]
    assert offloaded_runs[1][2]["nvme"] > 0
