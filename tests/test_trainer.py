"""ZeroTrainer on 2 gloo ranks (through torchrun) against the plain Trainer on one process."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, TrainingArguments

import hf_zero
from hf_zero import ZeroTrainer
from hf_zero.optim_state import load_unsharded_optimizer_state
from hf_zero.testing.launch import torchrun
from hf_zero.testing.tiny_models import build_model, make_samples, slice_samples


def _plain(out, precision="fp32"):
    command = [
        sys.executable,
        "-m",
        "hf_zero.testing.trainer_run",
        "plain",
        str(out),
        "--precision",
        precision,
    ]
    subprocess.run(command, check=True, capture_output=True, timeout=600)
    return json.loads((out / "report.json").read_text())


def _zero(out, stage, precision="fp32", resume=False):
    args = [str(out), "--stage", str(stage), "--precision", precision] + (["--resume"] if resume else [])
    torchrun("hf_zero.testing.trainer_run", 2, ["zero", *args])
    return json.loads((out / "report.json").read_text())


@pytest.fixture(scope="module")
def plain_fp32(tmp_path_factory):
    out = tmp_path_factory.mktemp("plain_fp32")
    return out, _plain(out)


@pytest.mark.parametrize("stage", [1, 2])
def test_zero_trainer_matches_plain_trainer(tmp_path, plain_fp32, stage):
    plain_dir, plain = plain_fp32
    resume = stage == 2
    zero = _zero(tmp_path, stage, resume=resume)
    for key in ("losses", "grad_norms"):
        torch.testing.assert_close(torch.tensor(zero[key]), torch.tensor(plain[key]), rtol=1e-5, atol=0)
    assert zero["learning_rates"] == plain["learning_rates"]
    assert zero["eval_loss"] == pytest.approx(plain["eval_loss"], rel=1e-5)
    assert zero["prediction_shape"] == plain["prediction_shape"]

    # save_model wrote a normal save_pretrained folder of fp32 weights that from_pretrained loads.
    saved = load_file(tmp_path / "final" / "model.safetensors")
    reference = load_file(plain_dir / "final" / "model.safetensors")
    assert saved.keys() == reference.keys()
    for key, value in reference.items():
        assert saved[key].dtype == torch.float32
        torch.testing.assert_close(saved[key], value, rtol=0, atol=5e-5, msg=key)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()

    if resume:
        # Resuming from the halfway checkpoint (one optimizer shard per rank) ends where the
        # uninterrupted run ended.
        resumed = load_file(tmp_path / "resumed" / "model.safetensors")
        for key, value in saved.items():
            torch.testing.assert_close(resumed[key], value, rtol=0, atol=0, msg=key)
        # load_best_model_at_end reloads the best checkpoint through the engine (masters included).
        best = load_file(tmp_path / "best_final" / "model.safetensors")
        first_checkpoint = load_file(tmp_path / "best" / "checkpoint-3" / "model.safetensors")
        assert any(not torch.equal(best[key], saved[key]) for key in saved)
        for key, value in first_checkpoint.items():
            torch.testing.assert_close(best[key], value, rtol=0, atol=0, msg=key)


def test_zero_trainer_bf16_tracks_plain_trainer(tmp_path):
    plain = _plain(tmp_path / "plain", "bf16")
    zero = _zero(tmp_path / "zero", 2, "bf16")
    # The plain Trainer autocasts fp32 weights; hf_zero computes on bf16 weights with fp32 masters.
    torch.testing.assert_close(torch.tensor(zero["losses"]), torch.tensor(plain["losses"]), rtol=1e-2, atol=0)
    assert zero["eval_loss"] == pytest.approx(plain["eval_loss"], rel=1e-2)


# ---- unsharded optimizer state, one process ----------------------------------------------------------


def _frozen_wpe_groups(model):
    """Two param groups with a frozen tensor inside the first, as a user may build them."""
    model.transformer.wpe.weight.requires_grad_(False)
    params = dict(model.named_parameters())
    decay = [p for n, p in params.items() if n.endswith("weight") and "ln_" not in n]
    return [{"params": decay}, {"params": [p for p in params.values() if all(p is not q for q in decay)]}]


def _adamw(model):
    groups = _frozen_wpe_groups(model)
    return torch.optim.AdamW(groups, lr=1e-3, weight_decay=0.1)


def _step(model, optimizer, batch):
    optimizer.zero_grad()
    model(**batch).loss.backward()
    optimizer.step()


def test_unsharded_optimizer_state_resumes_training_exactly():
    """Positions count across groups and include frozen tensors; the saved lr wins, as in torch."""
    samples = make_samples("gpt2", 12)
    plain = build_model("gpt2")
    optimizer = _adamw(plain)
    for step in range(2):
        _step(plain, optimizer, slice_samples(samples, 4 * step, 4))
    saved = optimizer.state_dict()
    resumed = build_model("gpt2", seed=1)
    resumed.load_state_dict(plain.state_dict())
    resumed_optimizer = _adamw(resumed)
    resumed_optimizer.param_groups[0]["lr"] = 0.5  # replaced by the saved value
    engine = hf_zero.initialize(resumed, resumed_optimizer, {"stage": 2, "precision": "fp32"})
    load_unsharded_optimizer_state(engine, saved)
    assert [group["lr"] for group in engine.optimizer.param_groups] == [1e-3, 1e-3]

    _step(plain, optimizer, slice_samples(samples, 8, 4))
    engine.backward(engine(**slice_samples(samples, 8, 4)).loss)
    engine.step()
    expected = plain.state_dict()
    for key, value in engine.full_state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=1e-6, msg=key)


def _saved_adamw_state() -> dict:
    model = build_model("gpt2")
    optimizer = _adamw(model)
    _step(model, optimizer, make_samples("gpt2", 4))
    return optimizer.state_dict()


def _drop_last_group(state):
    state["param_groups"].pop()


def _shrink_first_group(state):
    state["param_groups"][0]["params"].pop()


def _as_sgd(state):
    for group in state["param_groups"]:
        del group["betas"], group["eps"]
        group["momentum"] = 0.9


def _forget_one_param(state):
    first_trained = next(iter(state["state"]))
    del state["state"][first_trained]


def _wrong_shape(state):
    entry = next(iter(state["state"].values()))
    entry["exp_avg"] = entry["exp_avg"][:1]


def _rename(state):
    group = state["param_groups"][0]
    group["param_names"] = [f"other.{i}" for i in range(len(group["params"]))]


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (_drop_last_group, r"holds 1 param group\(s\) of sizes \[\d+\], but the optimizer was built with 2"),
        (_shrink_first_group, r"of sizes \[\d+, \d+\], but .* different grouping of its parameters"),
        (_as_sgd, r"has no \['betas', 'eps'\].*different kind of optimizer"),
        (_forget_one_param, r"holds nothing for \['transformer.wte.weight'\] in param group 0"),
        (_wrong_shape, r"'exp_avg' for parameter \S+ has shape \(1, \d+\) but the parameter has shape"),
        (_rename, r"names its parameters differently .* saved 'other.0', model 'transformer.wte.weight'"),
    ],
)
def test_unsharded_optimizer_state_that_does_not_fit_is_refused(corrupt, message):
    state = _saved_adamw_state()
    corrupt(state)
    model = build_model("gpt2")
    engine = hf_zero.initialize(model, _adamw(model), {"stage": 2})
    with pytest.raises(ValueError, match=message):
        load_unsharded_optimizer_state(engine, state)
    assert not engine.optimizer.state  # nothing was loaded


def _args(tmp_path, **kwargs):
    return TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, **kwargs)


def test_config_that_contradicts_training_arguments_is_refused(tmp_path):
    model = build_model("gpt2")
    with pytest.raises(
        ValueError, match=r"gradient_clipping=0\.3 disagrees with TrainingArguments\.max_grad_norm"
    ):
        ZeroTrainer(
            model=model, args=_args(tmp_path, max_grad_norm=1.0), zero_config={"gradient_clipping": 0.3}
        )
    with pytest.raises(ValueError, match="gradient_accumulation_steps=4 disagrees"):
        ZeroTrainer(
            model=model,
            args=_args(tmp_path, gradient_accumulation_steps=2),
            zero_config={"gradient_accumulation_steps": 4},
        )
    with pytest.raises(ValueError, match="unknown ZeroConfig field 'stagee'; did you mean 'stage'"):
        ZeroTrainer(model=model, args=_args(tmp_path), zero_config={"stagee": 2})


@pytest.mark.parametrize(
    ("training_args", "zero_config", "message"),
    [
        ({"fp16": True}, None, "precision='fp16' needs dynamic loss scaling"),
        ({}, {"precision": "fp16"}, "precision='fp16' needs dynamic loss scaling"),
        ({}, {"stage": 3}, "stage 3 .* is not available yet"),
        ({}, {"offload_optimizer": "cpu"}, "offloading to CPU or NVMe is not available yet"),
    ],
)
def test_unavailable_features_are_refused_when_the_trainer_is_built(
    tmp_path, training_args, zero_config, message
):
    with pytest.raises(NotImplementedError, match=message):
        ZeroTrainer(model=build_model("gpt2"), args=_args(tmp_path, **training_args), zero_config=zero_config)
