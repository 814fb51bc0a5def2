"""ZeroAccelerator refuses, when it is built, what it cannot run (on 2 gloo ranks, through torchrun).

One launch per mode of `hf_zero.testing.accelerate_run` (start-up dominates on CPU); each test
checks one property of what it wrote.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

from hf_zero import ZeroAccelerator
from hf_zero.testing.launch import torchrun

WORLD = 2
MODULE = "hf_zero.testing.accelerate_run"


def _launch(mode: str, out: Path) -> list[dict]:
    torchrun(MODULE, WORLD, [mode, str(out)])
    return [torch.load(out / f"rank{rank}.pt") for rank in range(WORLD)]


# ---- world size, early refusals ------------------------------------------------------------


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
        ({"zero_config": {"stage": 3}}, "stage 3"),
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
