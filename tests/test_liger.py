"""Liger-Kernel in the loop: Liger-patched models shard and train like unpatched ones.

Liger's kernels are Triton kernels; without a GPU they run under Triton's interpreter
(TRITON_INTERPRET=1, conftest.py). There its RoPE and fused linear cross-entropy run; its RMSNorm
and SwiGLU kernels do not (Triton 3.9's interpreter fails inside them), and its RoPE returns NaN
in bf16 — so on CPU fp32 runs RoPE and the fused cross-entropy, bf16 the fused cross-entropy only.
On a GPU every kernel runs.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from transformers import TrainingArguments

from hf_zero import ZeroTrainer
from hf_zero.cli.recipes import Recipe, run_recipe, training_arguments
from hf_zero.testing.launch import torchrun
from hf_zero.testing.tiny_models import build_model
from hf_zero.testing.trainer_run import LogRecorder, TensorDataset, causal_lm_samples

pytest.importorskip("liger_kernel")
pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
    reason="Liger's kernels need a GPU or Triton's interpreter",
)

ON_CPU = not torch.cuda.is_available()
FP32_KERNELS = {"rms_norm": False, "swiglu": False} if ON_CPU else {}
BF16_KERNELS = {"rms_norm": False, "swiglu": False, "rope": False} if ON_CPU else {}
# Four steps: the unpatched loss falls 0.15 over them (the check below asks 0.1; over six steps, on
# other batches, it fell 0.1002), and the comparisons keep their margins (fp32 weights 7.5e-6 apart
# relative to what training moved, bf16 0.042; 3.4e-6 and 0.037 over six steps).
STEPS = 4

# Liger patches some functions module-wide: unpatched runs go first in the launch.
JOBS = [
    {"name": "plain_fp32", "stage": 3, "steps": STEPS},
    {"name": "plain_bf16", "stage": 3, "steps": STEPS, "precision": "bf16"},
    {"name": "liger_bf16", "stage": 3, "steps": STEPS, "precision": "bf16", "liger": BF16_KERNELS},
    {"name": "liger_fp32", "stage": 3, "steps": STEPS, "liger": FP32_KERNELS},
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("liger")
    (out / "jobs.json").write_text(json.dumps(JOBS))
    torchrun("hf_zero.testing.liger_checks", 2, [str(out / "jobs.json"), str(out)])
    return {job["name"]: torch.load(out / f"{job['name']}.pt", weights_only=False) for job in JOBS}


def _relative_difference(got: dict, want: dict) -> float:
    """‖w_liger − w_plain‖ / ‖w_plain − w_init‖: the difference relative to what training moved."""
    init = build_model("llama").state_dict()
    diff = torch.cat([(got[k] - v).flatten() for k, v in want.items()])
    moved = torch.cat([(v - init[k].float()).flatten() for k, v in want.items()])
    return (diff.norm() / moved.norm()).item()


@pytest.mark.parametrize(
    ("liger", "plain", "loss_rtol", "weight_tol"),
    [
        ("liger_fp32", "plain_fp32", 1e-5, 1e-3),
        ("liger_bf16", "plain_bf16", 5e-3, 0.1),
    ],
)
def test_liger_patched_llama_shards_and_trains_like_the_unpatched_one(
    runs, liger, plain, loss_rtol, weight_tol
):
    got, want = runs[liger], runs[plain]
    assert want["losses"][-1] < want["losses"][0] - 0.1  # the loss really moved
    torch.testing.assert_close(
        torch.tensor(got["losses"]), torch.tensor(want["losses"]), rtol=loss_rtol, atol=0
    )
    assert got["weights"].keys() == want["weights"].keys()
    assert _relative_difference(got["weights"], want["weights"]) < weight_tol
    # The fused linear cross-entropy never builds the (tokens x vocabulary) logits.
    assert not any(got["logits_returned"]) and all(want["logits_returned"])


def test_zero_trainer_applies_liger_with_use_liger_kernel(tmp_path):
    args = TrainingArguments(
        output_dir=str(tmp_path),
        use_cpu=ON_CPU,
        report_to=[],
        max_steps=4,
        per_device_train_batch_size=2,
        learning_rate=3e-3,
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        use_liger_kernel=True,
        # Module-wide patches would outlive this test in the process: the fused loss only.
        liger_kernel_config={"rope": False, "rms_norm": False, "swiglu": False},
    )
    recorder = LogRecorder()
    model = build_model("llama")
    trainer = ZeroTrainer(
        model=model,
        args=args,
        train_dataset=TensorDataset(causal_lm_samples(8)),
        callbacks=[recorder],
        zero_config={"stage": 3},
    )
    trainer.train()  # the Trainer patches the model as train() starts, before hf_zero shards it
    assert "liger_kernel" in model.forward.__func__.__module__
    losses = [log["loss"] for log in recorder.logs]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    assert trainer.zero_engine is not None and trainer.zero_engine.config.stage == 3


def test_a_recipe_switches_liger_on(tmp_path):
    # Batches of 2 rows of 16 tokens: on CPU the fused cross-entropy runs in Triton's interpreter,
    # at a cost per token, and the recipe only has to train with it.
    recipe_file = tmp_path / "llama.yaml"
    recipe_file.write_text(
        f"""
model:
  architecture: llama
  kernels: liger
  kernel_config: {{rope: false, rms_norm: false, swiglu: false}}
  config: {{hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2, num_attention_heads: 4,
           num_key_value_heads: 2, vocab_size: 256, max_position_embeddings: 64}}
data: {{source: markov, num_sequences: 16, sequence_length: 16, eval_sequences: 0}}
training: {{output_dir: {tmp_path / "run"}, max_steps: 2, per_device_train_batch_size: 2, save_strategy: "no",
           disable_tqdm: true}}
zero: {{stage: 2}}
"""
    )
    recipe = Recipe.load(recipe_file)
    args = training_arguments(recipe, "llama")
    assert args["use_liger_kernel"] is True and args["liger_kernel_config"]["rope"] is False
    result = run_recipe(recipe)
    assert result.train_metrics["train_loss"] > 0 and (tmp_path / "run" / "model.safetensors").is_file()
    with pytest.raises(ValueError, match="no kernels for model type 'gpt2'"):
        training_arguments(recipe, "gpt2")
