"""Operations per training step, counted (hf_zero/testing/op_counts.py, 2 gloo ranks, the Trainer's
two param groups, clipping): below stage 3 the segments span the layers, so a 22-layer Llama issues
as many collectives, optimizer-kernel calls and gradient-statistics reads per step as a 4-layer
one; stage 3 issues at most one collective per unit and phase, whatever its param groups (small
units gathered several at a time); and the host waits for the device a fixed number of times per
step, through the device layer (`hf_zero/core/device.py`), whatever the depth; and gradient staging
allocates nothing after the first step."""

from __future__ import annotations

import json

import pytest

from hf_zero.testing.launch import torchrun
from hf_zero.testing.op_counts import LAYERS


@pytest.fixture(scope="module")
def counts(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("op_counts")
    (folder / "swap").mkdir()
    torchrun("hf_zero.testing.op_counts", 2, [str(folder / "counts.json"), str(folder / "swap")], timeout=300)
    return json.loads((folder / "counts.json").read_text())


def _depths(counts: dict, case: str) -> tuple[dict, dict]:
    return tuple(counts[f"{case}-layers{layers}"] for layers in LAYERS)


@pytest.mark.parametrize("case", ["stage1", "stage2", "stage2-bf16", "stage2-fp16"])
def test_below_stage_3_the_count_does_not_grow_with_the_layers(counts, case):
    shallow, deep = _depths(counts, case)
    assert deep["parameter_tensors"] > 5 * shallow["parameter_tensors"]
    for key in ("collectives", "optimizer_calls", "stats_tensors"):
        assert deep[key] == shallow[key], key
    # Per step, with two param groups in one bucket each: at stage 1 one reduce-scatter of both
    # (coalesced), at stage 2 one per group as its bucket fills; one all-reduce of the gradient
    # statistics; one all-gather publishing both groups. One kernel call per group; the statistics
    # read stage 2's gradient shards in one (both groups' shards are carved from one buffer), and
    # stage 1's chunk of each group's full gradient.
    assert deep["collectives"] == (3 if case == "stage1" else 4)
    assert deep["optimizer_calls"] == 2
    assert deep["stats_tensors"] == (2 if case == "stage1" else 1)


@pytest.mark.parametrize("case", ["stage3", "stage3-bf16", "stage3-no-prefetch"])
def test_stage_3_issues_one_collective_per_unit_and_phase_at_most_and_one_launch_per_param_group(
    counts, case
):
    for layers, got in zip(LAYERS, _depths(counts, case), strict=True):
        # The root (the final norm: no decay), the input embedding and the head (decay), and each
        # layer (both param groups).
        assert got["segments"] == 1 + 1 + 1 + 2 * layers
        # Each unit's segments (both param groups) travel together, and every unit is reduced once
        # when its backward ends; plus the statistics' all-reduce.
        reductions = layers + 3
        if case == "stage3-no-prefetch":
            # Gathered on demand: every layer and the head in forward and again in backward; the
            # root (it stays gathered for the step) and the embedding (its backward needs no
            # weights) once.
            assert got["collectives"] == 2 * (layers + 1) + 2 + reductions + 1
        else:
            # These units are far below the default prefetch budget (64 MiB): a pass gathers its
            # first unit on demand and all the others ahead in one all-gather; the root once.
            assert got["collectives"] == (1 + 2) + 2 + reductions + 1
        # Masters, moments, gradients and 16-bit shards are carved from one buffer per kind, each
        # param group's segments end to end: one kernel call per param group, one statistics read.
        assert got["optimizer_calls"] == 2
        assert got["stats_tensors"] == 1


@pytest.mark.parametrize(
    ("case", "host_syncs"),
    [
        ("stage1", 0),
        ("stage2-bf16", 0),
        ("stage3-bf16", 0),
        ("stage2-fp16", 1),  # the overflow flag, read once after the step's kernels are queued
        ("stage3-offload", 1),  # the gradient factor and flag, read together for the host update
        ("stage3-offload-rmsprop", 2),  # and one wait for every torch-path gradient download
        ("stage2-nvme", 1),
        ("stage3-nvme-params", 1),
    ],
)
def test_the_host_waits_a_fixed_number_of_times_per_step(counts, case, host_syncs):
    shallow, deep = _depths(counts, case)
    assert shallow["host_syncs"] == deep["host_syncs"] == host_syncs
    if "offload" not in case and "nvme" not in case:
        assert deep["event_waits"] == 0
    if case in ("stage3-offload", "stage2-nvme"):
        # Offload streams segment by segment: each waits for its own download and upload only.
        assert deep["segments"] > shallow["segments"]
        assert deep["event_waits"] == 2 * deep["segments"]
    if case == "stage3-nvme-params":
        # Every gather brings each segment's shard up from the file through a page-locked bounce
        # buffer, asynchronously: the only extra waits are for the upload that last used the
        # buffer (two take turns), never a synchronisation of the device.
        for got in (shallow, deep):
            # Each layer's two segments and the head's one gathered in forward and in backward, the
            # root's one and the embedding's one once.
            assert got["uploads"] == 2 * got["segments"] - 2
            # The optimizer's swap-ins (download and upload) and one wait per shard brought up.
            assert got["event_waits"] == 2 * got["segments"] + got["uploads"]


def test_nvme_parameter_shards_are_read_ahead_one_unit_past_the_prefetch(counts):
    """With one unit prefetched at a time, the swap file's reader reads the unit after it from the
    disk while the units before compute: every layer added is read ahead in both passes."""
    shallow, deep = _depths(counts, "stage3-nvme-params-one-ahead")
    assert 0 < shallow["read_ahead"] < shallow["uploads"]
    assert deep["read_ahead"] - shallow["read_ahead"] == deep["uploads"] - shallow["uploads"] > 0
    # Reads ahead change neither what is uploaded nor how often the host waits.
    assert deep["uploads"] == 2 * deep["segments"] - 2 and deep["host_syncs"] == 1
    assert deep["event_waits"] == 2 * deep["segments"] + deep["uploads"]
    # The default budget gathers these tiny units all at once: nothing is left to read ahead.
    assert _depths(counts, "stage3-nvme-params")[1]["read_ahead"] == 0


def test_nvme_parameter_shards_are_read_ahead_as_far_as_the_prefetch_budget(counts):
    """With four layers' budget the gatherer issues units several at a time (once half the budget
    is free); the reader reads all the units the budget covers ahead, not only the first of the
    next batch: again every layer added is read ahead in both passes."""
    shallow, deep = _depths(counts, "stage3-nvme-params-four-ahead")
    assert 0 < shallow["read_ahead"] < shallow["uploads"]
    assert deep["read_ahead"] - shallow["read_ahead"] == deep["uploads"] - shallow["uploads"] > 0
    assert deep["uploads"] == 2 * deep["segments"] - 2 and deep["host_syncs"] == 1
    assert deep["event_waits"] == 2 * deep["segments"] + deep["uploads"]


@pytest.mark.parametrize("case", ["stage2", "stage2-bf16", "stage2-fp16", "stage3", "stage3-bf16"])
def test_gradient_staging_reuses_its_buffers_after_the_first_step(counts, case):
    """Stages 2 and 3 stage every gradient bucket in a short-lived buffer from the device layer; on
    the CPU its pool serves every one of them from the first step's blocks."""
    for got in _depths(counts, case):
        assert got["scratch_buffers"] > 0
        assert got["scratch_allocations"] == 0
