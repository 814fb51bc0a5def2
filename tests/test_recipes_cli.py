"""Recipes and the `hf-zero` command, including the README's main job on 2 processes."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from hf_zero.cli import main
from hf_zero.recipes import Recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "gpt2-clm-pretrain.yaml"


def test_shipped_recipe_loads_and_overrides_apply():
    recipe = Recipe.load(
        RECIPE, ["training.max_steps=7", "zero.stage=1", "model.config.n_layer=1", "zero.overlap_comm=false"]
    )
    assert recipe.training["max_steps"] == 7
    assert recipe.zero["stage"] == 1 and recipe.zero["overlap_comm"] is False
    assert recipe.model["config"]["n_layer"] == 1


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["max_steps=3"], "names unknown section 'max_steps'"),
        (["trainng.max_steps=3"], "did you mean 'training'"),
        (["training"], "must look like section.key=value"),
        (["zero=2"], "must name a field inside 'zero'"),
        (["zero.stage=9"], r"ZeroConfig.stage=9 is not allowed"),
        (["data.rows=10"], r"unknown data field\(s\) \['rows'\]"),
        (["data.source=wikipedia"], "data.source='wikipedia' is not allowed"),
        (["model.task=seq2seq"], "model.task='seq2seq' is not allowed"),
        (["model.kernels=cuda"], "model.kernels='cuda' is not allowed"),
        (["model.kernel_config=3"], "model.kernel_config must be a mapping"),
        # Typos a newcomer makes: each named, with the closest valid key, before anything launches.
        (
            ["model.config.n_layers=2"],
            r"model.config.n_layers is not a field of the gpt2 config; did you mean 'n_layer'",
        ),
        (
            ["model.architecture=gtp2"],
            r"model.architecture='gtp2' is not a model type transformers knows; did you mean 'gpt2'",
        ),
        (["model.config=3"], "model.config must be a mapping"),
        (
            ["training.max_stepz=3"],
            r"training.max_stepz is not a transformers.TrainingArguments field; did you mean 'max_steps'",
        ),
        (["zero.offload_optimizer=nvme", "zero.nvme_path=/no/such/folder"], "is not an existing folder"),
    ],
)
def test_bad_overrides_are_named(overrides, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        Recipe.load(RECIPE, overrides)


def test_recipe_structure_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {task: causal-lm}\ntraining: {output_dir: x}\n")
    with pytest.raises(ValueError, match=r"model.architecture is required"):
        Recipe.load(bad)
    bad.write_text("model: {architecture: gpt2}\ntraining: {}\n")
    with pytest.raises(ValueError, match=r"training.output_dir is required"):
        Recipe.load(bad)
    bad.write_text("model: {architecture: gpt2}\nextras: {}\n")
    with pytest.raises(ValueError, match=r"unknown section\(s\) \['extras'\]"):
        Recipe.load(bad)


def test_cli_reports_bad_input_without_a_traceback(capsys, tmp_path):
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["frobnicate"]) == 2
    assert main([]) == 2
    capsys.readouterr()
    assert main(["--version"]) == 0 and capsys.readouterr().out.startswith("hf-zero 0.")
    # Usage errors exit 2 and say what is missing.
    for args, message in (
        (["train"], "RECIPE is required"),
        (["train", "--nproc", "2"], "RECIPE is required"),
        (["train", str(RECIPE), "--nproc", "0"], "--nproc must be at least 1, got 0"),
    ):
        with pytest.raises(SystemExit) as exited:
            main(args)
        assert exited.value.code == 2 and message in capsys.readouterr().err
    assert main(["train", str(RECIPE), "model.config.n_layers=2"]) == 2
    assert "did you mean 'n_layer'" in capsys.readouterr().err
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert "transformers" in out and "gloo" in out
    assert "locked mem" in out and "host memory" in out and "nvme_path" not in out
    assert main(["env", "--nvme-path", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"nvme_path    {tmp_path}: " in out and "free of" in out and "writable" in out
    assert main(["env", "--nvme-path", str(tmp_path / "missing")]) == 0
    assert "not a folder" in capsys.readouterr().out


def test_main_job_trains_on_two_processes_and_the_loss_falls(tmp_path):
    out = tmp_path / "run"
    overrides = [
        f"training.output_dir={out}", "training.max_steps=40", "training.logging_steps=10",
        "training.eval_strategy=no", "training.warmup_steps=4", "data.num_sequences=1024",
        "data.eval_sequences=64", "model.config.n_layer=2",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "hf_zero.cli", "train", str(RECIPE), "--nproc", "2", *overrides],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    logged = [ast.literal_eval(line) for line in result.stdout.splitlines() if line.startswith("{'loss'")]
    losses = [float(entry["loss"]) for entry in logged]
    assert len(losses) == 4
    assert losses[-1] < losses[0] - 1.0  # from ~6.2 (uniform over 512 tokens) well on the way down
    assert "hf-zero train: done" in result.stdout
    # One summary before the processes start: model and size, data, world, stage, precision, output.
    summaries = [line for line in result.stdout.splitlines() if line.startswith("hf-zero train: gpt2 (")]
    assert len(summaries) == 1 and "2 process(es), ZeRO stage 2, fp32; output to" in summaries[0]
    assert "eval_loss" in result.stdout
    weights = load_file(out / "model.safetensors")
    assert "transformer.wte.weight" in weights
