"""Moving per-parameter optimizer state onto flat shards on the `device` fixture's device (conftest.py)."""

from __future__ import annotations

import pytest
import torch

from hf_zero.core.layout import FlatLayout
from hf_zero.engine.optim import shard_param_state


def _layout(params, num_shards=2):
    return FlatLayout([str(i) for i in range(len(params))], [p.shape for p in params], num_shards, 100)


def test_parameter_shaped_state_is_sharded_and_scalars_kept_once(device):
    params = [torch.zeros(10, 3), torch.zeros(70)]
    states = [
        {"step": torch.tensor(4.0), "exp_avg": torch.full((10, 3), 1.0)},
        {"step": torch.tensor(4.0), "exp_avg": torch.full((70,), 2.0)},
    ]
    layout = _layout(params)
    shards = [shard_param_state(states, params, layout, rank, device) for rank in range(2)]
    assert all(s["exp_avg"].device.type == device.type for s in shards)
    assert all(float(s["step"]) == 4.0 for s in shards)
    owned = sum(float(s["exp_avg"].sum()) for s in shards)
    assert owned == 30 * 1.0 + 70 * 2.0


def test_state_that_cannot_be_sharded_is_refused(device):
    params = [torch.zeros(4), torch.zeros(4)]
    layout = _layout(params)
    with pytest.raises(ValueError, match="holds state for only some parameters"):
        shard_param_state([{"step": 1}, {}], params, layout, 0, device)
    with pytest.raises(ValueError, match="neither shaped like its parameters nor the same scalar"):
        shard_param_state([{"step": 1}, {"step": 2}], params, layout, 0, device)
    assert shard_param_state([{}, {}], params, layout, 0, device) == {}
