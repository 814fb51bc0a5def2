"""Runs end cleanly: what an engine holds ends with it, and launched ranks exit 0 through the
interpreter's ordinary teardown (see `hf_zero.engine.teardown`).

The launches cost a fresh interpreter per rank; `HF_ZERO_EXIT_LAUNCHES` sets how many per mode
(default 1: every mode once, the endings in turn, so each ending once). The test starts the ranks
from its own process (`exit_runs.launch_modes`), not through a driver interpreter of their own;
`python -m hf_zero.testing.exit_runs` runs the 20-per-mode version by hand.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import threading
import weakref

import pytest
import torch
import torch.distributed as dist
from torch import nn

import hf_zero
from hf_zero.engine import teardown
from hf_zero.testing.exit_runs import ENDINGS, MODES, launch_modes

LAUNCHES = int(os.environ.get("HF_ZERO_EXIT_LAUNCHES", "1"))


def test_launched_ranks_exit_cleanly_in_every_mode_and_ending(tmp_path):
    reports = list(launch_modes(list(MODES), LAUNCHES, tmp_path))  # tmp_path: the nvme mode's folder
    assert [report["mode"] for report in reports] == list(MODES)
    assert {ending for report in reports for ending in report["endings"]} == set(ENDINGS)
    failures = [failure for report in reports for failure in report["failures"]]
    assert not failures, json.dumps(failures, indent=1)[-8000:]


def _trained_engine(config: dict) -> hf_zero.ZeroEngine:
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1))
    engine = hf_zero.initialize(model, torch.optim.AdamW(model.parameters(), lr=1e-2), config)
    for _ in range(2):
        engine.backward(engine(torch.randn(4, 8)).square().mean())
        engine.step()
        engine.zero_grad()
    return engine


@pytest.mark.parametrize("offload", ["delayed", "nvme"])
def test_close_and_garbage_collection_end_the_engine_threads(offload, tmp_path):
    config = (
        {"stage": 3, "offload_optimizer": "cpu", "offload_overlap": "delayed"}
        if offload == "delayed"
        else {"stage": 2, "offload_optimizer": "nvme", "nvme_path": str(tmp_path)}
    )
    before = set(threading.enumerate())
    engine = _trained_engine(config)
    own = set(threading.enumerate()) - before
    assert own, "the engine runs threads of its own (host update or swap IO)"
    engine.close()  # with a host update still in flight in the delayed mode
    assert not own & set(threading.enumerate())

    engine = _trained_engine(config)
    own = set(threading.enumerate()) - before
    engine.finish_delayed_update()  # an update in flight holds the optimizer, and so the engine
    collected = weakref.ref(engine)
    del engine
    gc.collect()
    assert collected() is None, "something the engine's release holds keeps the engine alive"
    assert not own & set(threading.enumerate())


def test_exit_destroys_the_default_gloo_group_unless_an_exception_ended_the_script(monkeypatch, tmp_path):
    assert not dist.is_initialized()
    monkeypatch.setattr(teardown, "_PENDING", [])  # other tests' engines are not this test's to release
    released = []

    class Engine:
        pass

    engines = [Engine(), Engine()]
    for engine in engines:
        teardown.release_before_teardown(weakref.finalize(engine, released.append, engine.__class__))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    monkeypatch.setattr(sys, "last_exc", None, raising=False)  # pytest records failed tests' errors there
    try:
        monkeypatch.setattr(sys, "last_value", ValueError("the script failed"), raising=False)
        teardown._before_teardown()
        assert dist.is_initialized() and not released  # a failing rank leaves at once, destroying nothing
        monkeypatch.setattr(sys, "last_value", None)
        teardown._before_teardown()
        assert not dist.is_initialized() and len(released) == 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
