"""`hf-zero train --nnodes 2`: two launchers on this machine play two nodes of one worker each.

With one output folder they train the GPT-2 recipe a few steps and write a complete checkpoint;
with a folder each (as nodes without shared storage would have) both refuse before writing
anything, naming the fix.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from hf_zero.cli import main
from hf_zero.integrations.resume import is_complete

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "gpt2-clm-pretrain.yaml"
# Two steps and a checkpoint are the whole story (both nodes train one run, and write one
# checkpoint); the data and model are cut down to match (most of a test's time is the four
# processes starting).
OVERRIDES = [
    "training.max_steps=2",
    "training.save_strategy=steps",
    "training.save_steps=2",
    "training.eval_strategy=no",
    "training.per_device_train_batch_size=4",
    "training.warmup_steps=1",
    "data.num_train=100",
    "data.num_eval=16",
    "model.config.n_layer=2",
]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _two_nodes(folders: list[Path]) -> list[subprocess.CompletedProcess]:
    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1")

    def command(node: int, folder: Path) -> list[str]:
        return [
            sys.executable, "-m", "hf_zero.cli", "train", str(RECIPE), "--nproc", "1", "--nnodes", "2",
            "--node-rank", str(node), "--master-addr", "127.0.0.1", "--master-port", str(port),
            f"training.output_dir={folder}", *OVERRIDES,
        ]  # fmt: skip

    launchers = [
        subprocess.Popen(
            command(node, folder),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=ROOT,
        )
        for node, folder in enumerate(folders)
    ]
    results = []
    for launcher in launchers:
        stdout, stderr = launcher.communicate(timeout=600)
        results.append(subprocess.CompletedProcess(launcher.args, launcher.returncode, stdout, stderr))
    return results


def test_two_nodes_sharing_the_output_folder_train_and_checkpoint(tmp_path):
    folder = tmp_path / "shared"
    results = _two_nodes([folder, folder])
    for result in results:
        assert result.returncode == 0, result.stderr[-4000:]
    assert "2 processes" in results[0].stdout  # one process on each node, one run
    assert is_complete(folder / "checkpoint-2")
    assert not list(folder.glob(".hf_zero-shared-*"))  # the markers are gone


def test_nodes_without_a_shared_output_folder_are_refused_by_name(tmp_path):
    results = _two_nodes([tmp_path / "node0", tmp_path / "node1"])
    for result in results:
        assert result.returncode != 0
        assert "is not one folder for all 2 processes" in result.stderr, result.stderr[-4000:]
        assert "storage every machine mounts" in result.stderr
    assert not (tmp_path / "node0" / "checkpoint-2").exists()


def test_several_nodes_need_the_address_of_node_0_and_a_node_rank_in_range(capsys):
    for argv, message in [
        (["--nnodes", "2"], "--nnodes above 1 needs --master-addr"),
        (["--nnodes", "2", "--node-rank", "2", "--master-addr", "10.0.0.1"], "--node-rank must be from 0 to"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main(["train", str(RECIPE), *argv])
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
