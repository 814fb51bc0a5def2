"""ZeroTrainer on 2 gloo ranks (through torchrun) against the plain Trainer on one process."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, TrainingArguments

from hf_zero import ZeroTrainer
from hf_zero.testing.launch import torchrun
from hf_zero.testing.tiny_models import build_model


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
