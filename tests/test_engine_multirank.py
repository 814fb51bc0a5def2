"""Every multi-rank case (2, 3 and 4 gloo ranks) against unsharded single-process training.

Each test checks one property of one case; the cases and their launches are in
`hf_zero.testing.matrix_cases` and the `sharded` fixture (conftest.py).
"""

from __future__ import annotations

import functools

import pytest
import torch

from hf_zero.testing.cases import BUCKET_SIZE, Case
from hf_zero.testing.matrix_cases import CASES_BY_WORLD, CORE_CASES, reference_world
from hf_zero.testing.tiny_models import MODEL_NAMES, build_model
from hf_zero.testing.unsharded import run_unsharded

MATRIX = [(world, case) for world, cases in CASES_BY_WORLD.items() for case in cases]
IDS = [f"{world}ranks-{case.name}" for world, case in MATRIX]
STATE_TENSORS = {
    "adamw": 2,
    "adamw_trainer": 2,
    "adamw_fused": 2,
    "adam": 2,
    "sgd": 1,
    "rmsprop": 1,
    "adagrad": 1,
    "muon": 2,  # AdamW's, for the rest; Muon's segments hold one (`muon_segments`)
    "muon_sgd": 1,
    "adafactor": 0,  # kept whole at the owners (`whole_state_bytes`)
}
# Linear in the gradient: the weights must match elementwise. Muon with SGD: two fp32 ranks sum
# gradients exactly as the reference does, and the rest of Muon's step is elementwise or whole-matrix.
EXACT = ("sgd", "muon_sgd", "adafactor")


@functools.cache
def reference(case: Case, world: int) -> dict:
    return run_unsharded(case, reference_world(case, world))


def update_relative_error(case: Case, got: dict, want: dict) -> float:
    """‖w_sharded − w_ref‖ / ‖w_ref − w_init‖ over all weights: error relative to what training moved."""
    init = {k: v.float() for k, v in build_model(case.model).state_dict().items() if v.is_floating_point()}
    diff = torch.cat([(got[k] - v).flatten() for k, v in want.items()])
    moved = torch.cat([(v - init[k]).flatten() for k, v in want.items()])
    return (diff.norm() / moved.norm()).item()


def first_ranks(results: list[dict], case: Case) -> list[dict]:
    """The result of the first rank of each process group that trained `case`."""
    seen, firsts = set(), []
    for result in results:
        entry = result[case.name]
        if "weights" in entry and entry["subgroup"] not in seen:
            seen.add(entry["subgroup"])
            firsts.append(entry)
    return firsts


@pytest.mark.parametrize(("world", "case"), MATRIX, ids=IDS)
def test_sharded_training_matches_unsharded(sharded, world, case):
    want = reference(case, world)
    # Training really moved the weights, so the comparisons below (relative to that movement)
    # would catch a step that did nothing.
    init = build_model(case.model).state_dict()
    moved = torch.cat([(v - init[k].float()).flatten() for k, v in want["weights"].items()]).norm()
    assert moved > 1e-5 * torch.cat([v.flatten() for v in want["weights"].values()]).norm()
    for got in first_ranks(sharded(world), case):
        assert set(got["weights"]) == set(want["weights"])
        if case.optimizer == "muon":
            # Newton–Schulz runs in bf16, where AdamW's last-bit differences (fused kernel against
            # torch's) flip roundings: measured 0.008-0.015 in fp32, 0.030-0.045 in bf16 (2026-12-06).
            loss_rtol, norm_rtol, weight_tol = 2e-2, 1e-2, (0.03 if case.precision == "fp32" else 0.08)
        elif case.precision == "fp32":
            loss_rtol, norm_rtol, weight_tol = 1e-6, 1e-6, (1e-5 if case.optimizer in EXACT else 2e-4)
        else:
            # bf16 rounds differently when ranks sum in another order: measured 0.003-0.034 over
            # these cases (2026-12-06, the largest for fp32 norms beside bf16 weights).
            loss_rtol, norm_rtol, weight_tol = 2e-2, 2e-3, 0.05
        torch.testing.assert_close(
            torch.tensor(got["losses"]), torch.tensor(want["losses"]), rtol=loss_rtol, atol=0
        )
        torch.testing.assert_close(
            torch.tensor(got["norms"]), torch.tensor(want["norms"]), rtol=norm_rtol, atol=0
        )
        assert update_relative_error(case, got["weights"], want["weights"]) < weight_tol
        if case.optimizer in EXACT and case.precision == "fp32":
            for key, value in want["weights"].items():
                torch.testing.assert_close(got["weights"][key], value, rtol=1e-6, atol=1e-7, msg=key)


@pytest.mark.parametrize(("world", "case"), MATRIX, ids=IDS)
def test_every_rank_computes_with_the_same_master_weights(sharded, world, case):
    per_rank = [results[case.name] for results in sharded(world)]
    assert all(r["model_matches_master"] for r in per_rank)
    for subgroup in {r["subgroup"] for r in per_rank}:
        assert len({r["weights_checksum"] for r in per_rank if r["subgroup"] == subgroup}) == 1


@pytest.mark.parametrize(("world", "model"), [*((2, m) for m in MODEL_NAMES), (4, "llama")])
def test_optimizer_state_per_rank_is_one_nth(sharded, world, model):
    results = sharded(world)
    for precision, optimizer in (("fp32", "adamw"), ("fp32", "sgd")):
        names = {
            c.stage: c.name
            for c in CORE_CASES
            if (c.model, c.precision, c.optimizer) == (model, precision, optimizer)
        }
        unsharded = results[0][names[0]]["state_numel"]
        assert all(r[names[0]]["state_numel"] == unsharded for r in results)
        tensors_per_element = unsharded // results[0][names[0]]["param_count"]
        for stage in (1, 2, 3):
            per_rank = [r[names[stage]]["state_numel"] for r in results]
            padded = sum(numel for numel, *_ in results[0][names[stage]]["segments"])
            # Each rank holds exactly its 1/N of the (padded) flat buffers; padding stays under 2%.
            assert per_rank == [tensors_per_element * padded // world] * world
            assert per_rank[0] * world <= 1.02 * unsharded


def expected_bytes_per_step(case: Case, world: int, got: dict) -> list[int]:
    """What data parallelism costs (DDP all-reduces 2Ψ(W−1)/W elements of gradient per step), per
    step, from the model's size alone: ZeRO 1/2 split that into a reduce-scatter of the gradients and
    an all-gather of the weights; stage 2 reduce-scatters every backward pass; steps that accumulate
    reduce fp32 sums at stages 0/1."""
    share = (world - 1) / world
    accumulating = case.accumulation > 1
    passes = case.accumulation + (case.scenario == "discard")
    steady = 0
    for numel, _, size, _, _ in got["segments"]:
        reduce_size = 4 if accumulating else size
        if case.stage == 0:
            steady += round(2 * share * numel * reduce_size)
        elif case.stage == 1:
            steady += round(share * numel * reduce_size) + round(share * numel * size)
        else:
            steady += round(passes * share * numel * size)
            if case.stage == 2:  # stage 3 gathers weights on use instead (below)
                steady += round(share * numel * size)
    if case.stage > 0 and (case.clipping > 0):
        steady += round(2 * share * 8)  # the all-reduced fp32 [squared norm, non-finite count]
    if case.stage > 0 and got["full_grads"]:
        steady += sum(round(2 * share * 4 * g.numel()) for g in got["full_grads"][0].values())
    if case.stage == 3:
        steady += _gather_bytes(case, share, got)
    steady += got["matrix_exchange_bytes"]  # Muon's two all-to-alls (checked on their own below)
    per_step = [steady] * case.steps
    if case.stage == 2 and case.overlap:
        # The first backward pass of a stage-2 engine agrees on hook counts, late gradients and
        # launch order, once (stage 3 launches each unit's buckets where the walk of units ends it,
        # with nothing to learn); a layer shared three times under reentrant checkpointing fires its
        # hooks after its bucket went, so those buckets get a second round in that pass.
        slots = sum(s for _, _, _, s, _ in got["segments"])
        buckets = sum(b for *_, b in got["segments"])
        # (the first pass's launch order, from rank 0's first forward; then counts and late
        # gradients; then the order backward really filled the buckets in)
        calibration = 8 * buckets + round(2 * share * 8 * (slots + buckets)) + 8 * buckets
        if case.model == "llama-shared":
            for segment, (_, _, size, _, _) in zip(got["buckets"], got["segments"], strict=True):
                shared = sum(numel for numel, names in segment if any(".layers.0." in n for n in names))
                calibration += round(share * shared * size)
        per_step[0] += calibration
        if case.scenario == "resume":
            per_step[case.steps // 2] += calibration
    return per_step


@pytest.mark.parametrize(("world", "case"), MATRIX, ids=IDS)
def test_bytes_sent_per_step_match_data_parallel(sharded, world, case):
    got = sharded(world)[0][case.name]
    if case.bucket_size == BUCKET_SIZE:
        assert sum(numel for numel, *_ in got["segments"]) <= 1.02 * got["param_count"]
    assert got["comm_bytes"] == expected_bytes_per_step(case, reference_world(case, world), got)


MUON = [(w, c) for w, c in MATRIX if c.optimizer.startswith("muon")]


@pytest.mark.parametrize(("world", "case"), MUON, ids=[f"{w}ranks-{c.name}" for w, c in MUON])
def test_muon_exchanges_each_element_of_its_matrices_at_most_once_each_way(sharded, world, case):
    """Muon's two all-to-alls carry bf16 pieces of its matrices to their owners and back: over all
    ranks, at most 2 bytes per matrix element each way (less what owners hold themselves), and
    nothing at stage 0, where every rank holds whole matrices."""
    results = [r[case.name] for r in sharded(world)]
    total = sum(r["matrix_exchange_bytes"] for r in results)
    elements = results[0]["muon_numel"]
    assert elements > 0
    if case.stage == 0:
        assert total == 0
    else:
        # Each owner holds about 1/W of its matrices already; the rest crosses twice, 2 bytes each.
        assert 0.5 * 4 * elements * (world - 1) / world < total <= 4 * elements


def _gather_bytes(case: Case, share: float, got: dict) -> int:
    """Stage 3 gathers every unit in each forward and again in each backward (the untied head
    too), but the input embedding only in forward (its backward needs no weights); the root unit
    once per micro-batch (it stays gathered through the backward pass). A layer used three times in
    one forward (the shared layer) is gathered at every use there, and once in backward, where it
    stays gathered from its last use's backward to its first's."""
    forwards = case.accumulation + (case.scenario == "discard") + (case.scenario == "eval_between")
    backwards = case.accumulation + (case.scenario == "discard")
    segments = [
        (numel, size, unit)
        for (numel, _, size, _, _), unit in zip(got["segments"], got["segment_units"], strict=True)
    ]
    segments += [(numel, size, unit) for numel, _, size, unit in got["frozen_segments"]]
    root = sum(round(share * numel * size) for numel, size, unit in segments if unit == 0)
    in_backward = [(numel, size, unit) for numel, size, unit in segments if unit in got["backward_units"]]
    layers = sum(round(share * numel * size) for numel, size, _ in in_backward)
    shared = (
        sum(
            round(share * numel * size)
            for numel, size, unit in in_backward
            if ".layers." in got["unit_names"][unit]
        )
        if case.model == "llama-shared"
        else 0
    )
    embedding = sum(round(share * numel * size) for numel, size, unit in segments if unit != 0) - layers
    return forwards * (root + embedding + layers + 2 * shared) + backwards * layers


def expected_memory(case: Case, world: int, got: dict) -> dict[str, int]:
    """The README's per-rank memory table for one case, from the segment sizes (Ψ padded elements)."""
    accumulating = case.accumulation > 1
    sharded_grads = case.stage >= 2 and world > 1
    memory = {"weights": 0, "masters": 0, "gradients": 0, "optimizer_state": 0}
    for _, shard, size, _ in got["frozen_segments"]:  # stage 3 shards frozen weights too
        memory["weights"] += shard * size
    for index, (numel, shard, size, _, _) in enumerate(got["segments"]):
        memory["weights"] += (shard if case.stage == 3 else numel) * size
        # fp32: at stage 0 the weights are the masters, at stage 3 each rank's shard is.
        memory["masters"] += 0 if (case.stage in (0, 3) and size == 4) else shard * 4
        memory["gradients"] += (shard if sharded_grads else numel) * (4 if accumulating else size)
        state_tensors = 1 if index in got["muon_segments"] else STATE_TENSORS[case.optimizer]
        memory["optimizer_state"] += state_tensors * shard * 4
    memory["optimizer_state"] += got["whole_state_bytes"]
    return memory


@pytest.mark.parametrize(("world", "case"), MATRIX, ids=IDS)
def test_engine_memory_matches_the_readme_table(sharded, world, case):
    for result in sharded(world):
        got = result[case.name]
        measured = {
            kind: got["memory"][kind] for kind in ("weights", "masters", "gradients", "optimizer_state")
        }
        assert measured == expected_memory(case, reference_world(case, world), got)
        full_gradient = sum(numel * size for numel, _, size, _, _ in got["segments"])
        buckets = sum(b for *_, b in got["segments"])
        if case.stage == 3:
            # Gathered at once: the root unit, the unit running and the prefetch budget (in
            # backward, a unit is released before the next one is waited for).
            per_unit: dict[int, int] = {}
            for (numel, _, size, _, _), unit in zip(got["segments"], got["segment_units"], strict=True):
                per_unit[unit] = per_unit.get(unit, 0) + numel * size
            for numel, _, size, unit in got["frozen_segments"]:
                per_unit[unit] = per_unit.get(unit, 0) + numel * size
            layers = sorted((b for u, b in per_unit.items() if u != 0), reverse=True)
            root = per_unit.get(0, 0)
            peak = got["memory"]["peak_gathered"]
            assert 0 < peak <= root + layers[0] + got["prefetch_bytes"]
            if case.model == "llama-deep" and got["prefetch_bytes"]:
                # Prefetching really holds more: the next unit while one runs.
                assert peak >= root + 2 * layers[-1]
        else:
            assert got["memory"]["peak_gathered"] == 0
        if case.stage < 2:
            assert got["memory"]["peak_staging"] == 0
        elif case.model == "llama-shared":
            # A layer used three times cannot be reduced before its last use's backward: its whole
            # gradient stays staged (in the first pass, with a second buffer for the late uses).
            assert got["memory"]["peak_staging"] <= 2 * full_gradient
        elif case.model == "branches" or not case.overlap or buckets < 8 or case.stage == 3:
            # (Stage 3 on gloo completes reductions at the end of the pass instead of waiting
            # mid-backward, where a blocked rank could hold up a gather its peer waits on.)
            # A rank cannot send a bucket its data never touched before its backward pass ends.
            assert got["memory"]["peak_staging"] <= full_gradient
        else:
            # Stage 2 stages gradients per bucket: at most a few buckets' worth are alive at once.
            assert 0 < got["memory"]["peak_staging"] <= 0.5 * full_gradient


STAGE3_DEEP = [(w, c) for w, c in MATRIX if c.model == "llama-deep"]


@pytest.mark.parametrize(("world", "case"), STAGE3_DEEP, ids=[f"{w}ranks-{c.name}" for w, c in STAGE3_DEEP])
def test_stage3_prefetches_each_next_unit_within_the_budget(sharded, world, case):
    """Every pass gathers its first unit on demand and each later one ahead of its use (the
    budget holds at least one unit), or none ahead when prefetching is off."""
    got = sharded(world)[0][case.name]
    forward = len(set(got["segment_units"]) - {0})  # the layers and the input embedding
    backward = len(got["backward_units"])  # the layers
    assert backward == forward - 1
    passes = case.accumulation * case.steps  # forward and backward of every micro-batch
    expected = passes * ((forward - 1) + (backward - 1))
    assert got["prefetched_units"] == (expected if got["prefetch_bytes"] else 0)
