"""`examples/accelerate_train.py`, an ordinary Accelerate loop with `ZeroAccelerator`, launched the
ways users launch it: `accelerate launch` with the shipped config file (two CPU processes here:
`distributed_type: MULTI_GPU` runs torchrun underneath, and the script passes `cpu=True` without
GPUs) and `torchrun`. Both equal the same training unsharded, step for step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hf_zero.testing.launch import local_launch_command

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "accelerate_train.py"
STEPS = 6


def _unsharded() -> tuple[list[float], float, dict[str, torch.Tensor]]:
    """The script's training on one process: each step is 2 micro-batches on each of 2 ranks
    (rank r takes every other batch), so step k sees batches 4k .. 4k+3."""
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import accelerate_train as example
    finally:
        sys.path.pop(0)
    from hf_zero.cli.data import markov_corpus

    torch.manual_seed(0)
    model = example.build_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    tokens = markov_corpus(2048 + 256, example.LENGTH, example.VOCAB, branching=4, seed=0)
    batches = tokens[:2048].split(8)
    losses = []
    for step in range(STEPS):
        last = []
        for index in range(4 * step, 4 * step + 4):
            loss = model(input_ids=batches[index], labels=batches[index]).loss
            (loss / 4).backward()
            if index >= 4 * step + 2:
                last.append(loss.item())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(sum(last) / 2)  # the script logs the last micro-batch's loss, averaged over ranks
    with torch.no_grad():
        evaluation = tokens[2048:]
        eval_loss = sum(
            model(input_ids=chunk, labels=chunk).loss.item() * len(chunk) for chunk in evaluation.split(32)
        ) / len(evaluation)
    return losses, eval_loss, {k: v.detach() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def reference():
    return _unsharded()


@pytest.mark.parametrize("launcher", ["accelerate", "torchrun"])
def test_the_example_trains_as_unsharded_training_under_both_launchers(tmp_path, reference, launcher):
    out = tmp_path / "run"
    script = [str(SCRIPT), "--out", str(out), "--steps", str(STEPS)]
    if launcher == "accelerate":
        config = ROOT / "examples" / "accelerate_config.yaml"
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), *script]
    else:
        command = local_launch_command(2, script)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads((out / "report.json").read_text())
    losses, eval_loss, weights = reference
    assert losses[-1] < losses[0] - 0.3  # it learns
    torch.testing.assert_close(torch.tensor(report["losses"]), torch.tensor(losses), rtol=1e-5, atol=0)
    assert report["eval_loss"] == pytest.approx(eval_loss, rel=1e-5)
    saved = load_file(out / "model" / "model.safetensors")
    for key, value in saved.items():
        torch.testing.assert_close(value, weights[key], rtol=1e-4, atol=1e-5, msg=key)
    assert (out / "state").is_dir()
