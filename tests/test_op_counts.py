"""Operations per training step, counted (hf_zero/testing/op_counts.py, 2 gloo ranks): below stage 3
the segments span the layers, so a 22-layer Llama issues as many collectives, optimizer-kernel
calls and gradient-statistics reads per step as a 4-layer one; stage 3 issues a bounded number
per unit."""

from __future__ import annotations

import json

import pytest

from hf_zero.testing.launch import torchrun
from hf_zero.testing.op_counts import LAYERS


@pytest.fixture(scope="module")
def counts(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("op_counts") / "counts.json"
    torchrun("hf_zero.testing.op_counts", 2, [str(out)], timeout=300)
    return json.loads(out.read_text())


@pytest.mark.parametrize("stage", [1, 2])
def test_below_stage_3_the_count_does_not_grow_with_the_layers(counts, stage):
    shallow, deep = (counts[f"stage{stage}-layers{layers}"] for layers in LAYERS)
    assert deep["parameter_tensors"] > 5 * shallow["parameter_tensors"]
    for key in ("collectives", "optimizer_calls", "stats_tensors"):
        assert deep[key] == shallow[key], key
    # Per step, with two param groups in one bucket each: a reduce-scatter and an all-gather per
    # group, and one all-reduce of the gradient statistics; one kernel call and one read per group.
    assert deep["collectives"] == 5
    assert deep["optimizer_calls"] == deep["stats_tensors"] == 2


def test_stage_3_issues_a_bounded_number_per_unit(counts):
    for layers in LAYERS:
        got = counts[f"stage3-layers{layers}"]
        segments = 2 * (layers + 1)  # (the root and each layer) x two param groups
        # Each segment gathered in forward and (the layers) again in backward, reduced once; plus
        # the statistics' all-reduce.
        assert got["collectives"] <= 3 * segments + 1
        assert got["optimizer_calls"] == got["stats_tensors"] == segments
