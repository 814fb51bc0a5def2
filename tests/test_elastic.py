"""Elastic restarts: `hf-zero train --max-restarts` survives killed workers and resumes by itself.

One run of the GPT-2 recipe on 2 gloo processes, 8 steps with a checkpoint every 2, meets two
SIGKILLs (`elastic_faults/sitecustomize.py` injects them): rank 0 right after checkpoint-4 is
written, and after the restart rank 1 in the middle of checkpoint-6's save. torchrun restarts
both processes each time; each restart resumes from checkpoint-4 (checkpoint-6 was never
finished), finishes every step and exits 0. Its final weights equal, bit for bit, those of an
uninterrupted run that resumed from the same checkpoint-4. That run saves its checkpoints
asynchronously (`zero.async_checkpoints`) and keeps one (`save_total_limit=1`): its last
checkpoint holds the same state, tensor for tensor, as the killed run's synchronous one.

The run is as short as that story allows (a checkpoint before the first kill, one the second kill
cuts short, one after it, and two saves after the resume for `save_total_limit` to act on), on a
model and data cut down to match: each restart starts both processes again, which costs more than
the steps.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hf_zero.cli.merge import merge_checkpoint
from hf_zero.integrations.resume import describe_checkpoint, is_complete, newest_complete_checkpoint

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "gpt2-clm-pretrain.yaml"
STEPS = 8
OVERRIDES = [
    f"training.max_steps={STEPS}",
    "training.save_strategy=steps",
    "training.save_steps=2",
    "training.eval_strategy=no",
    "training.logging_steps=2",
    "training.per_device_train_batch_size=4",
    "training.warmup_steps=1",
    "data.num_train=200",  # 116 blocks of 64 tokens: the 64 that 8 steps take, in one epoch
    "data.num_eval=16",
    "model.config.n_layer=2",
]


def _train(output_dir: Path, *extra: str, kills: str = "", restarts: int = 0) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_ZERO_TEST_KILLS=kills, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(
        [str(Path(__file__).parent / "elastic_faults"), *filter(None, [env.get("PYTHONPATH")])]
    )
    command = [
        sys.executable, "-m", "hf_zero.cli", "train", str(RECIPE), "--nproc", "2",
        "--max-restarts", str(restarts), f"training.output_dir={output_dir}", *OVERRIDES, *extra,
    ]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("elastic")
    killed = _train(root / "killed", kills="0:0:after-save:4,1:1:mid-save:6", restarts=2)
    assert killed.returncode == 0, killed.stderr[-5000:]
    # The uninterrupted run: the same checkpoint-4, resumed once, no kills, asynchronous saves.
    reference = root / "reference"
    reference.mkdir()
    shutil.copytree(root / "killed" / "checkpoint-4", reference / "checkpoint-4")
    resumed = _train(
        reference,
        f"training.resume_from_checkpoint={reference / 'checkpoint-4'}",
        "training.save_total_limit=1",
        "zero.async_checkpoints=true",
    )
    assert resumed.returncode == 0, resumed.stderr[-5000:]
    return {"killed": (root / "killed", killed), "reference": (reference, resumed)}


def test_each_restart_resumes_from_the_newest_complete_checkpoint_and_says_so(runs):
    folder, result = runs["killed"]
    line = "hf_zero: resumed from checkpoint-4, saved by 2 processes at stage 2"
    # After the kill behind checkpoint-4, and after the kill in checkpoint-6's save.
    assert result.stdout.count(line) == 2, result.stdout[-3000:]
    assert result.stderr.count("failed (exitcode: -9)") == 2  # torchrun saw both kills
    # The last attempt saved checkpoint-6 again, whole.
    assert all(is_complete(folder / f"checkpoint-{step}") for step in (2, 4, 6, 8))


def test_every_step_is_done_and_the_weights_equal_an_uninterrupted_resume(runs, tmp_path):
    folder, _ = runs["killed"]
    reference, _ = runs["reference"]
    state = json.loads((folder / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())
    assert state["global_step"] == STEPS
    assert newest_complete_checkpoint(folder) == str(folder / f"checkpoint-{STEPS}")
    got, want = load_file(folder / "model.safetensors"), load_file(reference / "model.safetensors")
    assert got.keys() == want.keys()
    assert all(torch.equal(got[name], want[name]) for name in want)
    merge_checkpoint(folder / "checkpoint-4" / "hf_zero_checkpoint", tmp_path / "step4")
    start = load_file(tmp_path / "step4" / "model.safetensors")
    assert any(not torch.equal(start[name], want[name]) for name in start)  # steps 5-8 trained


def test_asynchronous_checkpoints_hold_the_same_state_and_older_ones_go_once_they_are_complete(runs):
    folder, _ = runs["killed"]
    reference, _ = runs["reference"]
    # save_total_limit=1: checkpoint-6 was deleted only once checkpoint-8 was complete.
    assert sorted(p.name for p in reference.glob("checkpoint-*")) == ["checkpoint-8"]
    assert is_complete(reference / "checkpoint-8")
    assert not list((reference / "checkpoint-8").glob(".*partial*"))
    for rank in range(2):
        name = f"hf_zero_checkpoint/rank-{rank:05d}-of-00002.safetensors"
        got, want = load_file(reference / "checkpoint-8" / name), load_file(folder / "checkpoint-8" / name)
        assert got.keys() == want.keys() and any("::exp_avg" in key for key in got)
        assert all(torch.equal(got[key], want[key]) for key in want)


def test_a_checkpoint_whose_save_was_cut_short_is_passed_over(tmp_path):
    def checkpoint(step: int, state: str | None, engine: bool = True) -> Path:
        folder = tmp_path / f"checkpoint-{step}"
        (folder / "hf_zero_checkpoint").mkdir(parents=True)
        if engine:
            manifest = {"world_size": 3, "stage": 1}
            (folder / "hf_zero_checkpoint" / "manifest.json").write_text(json.dumps(manifest))
        (folder / "scheduler.pt").write_bytes(b"")
        if state is not None:
            (folder / "trainer_state.json").write_text(state)
        return folder

    assert newest_complete_checkpoint(tmp_path / "missing") is None
    assert newest_complete_checkpoint(tmp_path) is None
    checkpoint(5, json.dumps({"global_step": 5}))
    checkpoint(30, json.dumps({"global_step": 30}), engine=False)  # the engine's save never finished
    checkpoint(20, '{"global_step": 2')  # killed while writing the trainer state
    checkpoint(25, None)  # killed before the trainer state
    checkpoint(15, json.dumps({"global_step": 10}))  # another run's state
    assert newest_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-5")
    assert describe_checkpoint(tmp_path / "checkpoint-5") == "checkpoint-5, saved by 3 processes at stage 1"
