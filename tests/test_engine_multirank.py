"""ZeRO stages 0/1/2 on 2 and 4 gloo ranks against unsharded single-process training.

One torchrun launch per world size runs every case (start-up dominates on CPU); each test then
checks one property of one case against `hf_zero.testing.unsharded`.
"""

from __future__ import annotations

import pytest
import torch

from hf_zero.testing.cases import Case, cases_to_json
from hf_zero.testing.launch import torchrun
from hf_zero.testing.tiny_models import MODEL_NAMES, build_model
from hf_zero.testing.unsharded import run_unsharded

STAGES = (0, 1, 2)
CORE_CASES = [
    Case(model, stage, precision, optimizer, accumulation, clipping)
    for model in MODEL_NAMES
    for stage in STAGES
    for precision, optimizer, accumulation, clipping in (
        ("fp32", "adamw", 1, 0.0),
        ("bf16", "adamw", 1, 0.0),
        ("fp32", "sgd", 2, 0.05),  # SGD is linear in the gradient: averaging errors show in full
    )
]
OPTIMIZER_CASES = [Case("gpt2", 2, "fp32", kind) for kind in ("adam", "rmsprop", "adagrad")]
MIXED_CASES = [Case("llama", 2, "bf16", "adamw", accumulation=2, clipping=0.05)]
ACCELERATE_CASES = [
    Case("gpt2", 1, "fp32", "sgd", accumulation=2, clipping=0.05, integration="accelerate"),
    Case("llama", 2, "bf16", "adamw", integration="accelerate"),
]
CASES = {2: CORE_CASES + OPTIMIZER_CASES + MIXED_CASES + ACCELERATE_CASES, 4: CORE_CASES}
MATRIX = [(world, case) for world, cases in CASES.items() for case in cases]
IDS = [f"{world}ranks-{case.name}" for world, case in MATRIX]


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """Per world size, the per-rank results of every case (one torchrun launch each, on first use)."""
    cache: dict[int, list[dict]] = {}

    def results(world: int) -> list[dict]:
        if world not in cache:
            out = tmp_path_factory.mktemp(f"matrix{world}")
            (out / "cases.json").write_text(cases_to_json(CASES[world]))
            torchrun("hf_zero.testing.engine_matrix", world, [str(out / "cases.json"), str(out)])
            cache[world] = [torch.load(out / f"rank{rank}.pt") for rank in range(world)]
        return cache[world]

    return results


def _update_relative_error(case: Case, got: dict, want: dict) -> float:
    """‖w_sharded − w_ref‖ / ‖w_ref − w_init‖ over all weights: error relative to what training moved."""
    init = {k: v.float() for k, v in build_model(case.model).state_dict().items() if v.is_floating_point()}
    diff = torch.cat([(got[k] - v).flatten() for k, v in want.items()])
    moved = torch.cat([(v - init[k]).flatten() for k, v in want.items()])
    return (diff.norm() / moved.norm()).item()


@pytest.mark.parametrize(("world", "case"), MATRIX, ids=IDS)
def test_sharded_training_matches_unsharded(sharded, world, case):
    got = sharded(world)[0][case.name]
    want = run_unsharded(case, world)
    assert set(got["weights"]) == set(want["weights"])
    if case.precision == "fp32":
        loss_rtol, norm_rtol = 1e-6, 1e-6
        weight_tol = (
            1e-5 if case.optimizer == "sgd" else 2e-4
        )  # Adam-type updates amplify rounding of ~0 grads
    else:
        loss_rtol, norm_rtol, weight_tol = 2e-2, 2e-3, 0.1
    torch.testing.assert_close(
        torch.tensor(got["losses"]), torch.tensor(want["losses"]), rtol=loss_rtol, atol=0
    )
    torch.testing.assert_close(
        torch.tensor(got["norms"]), torch.tensor(want["norms"]), rtol=norm_rtol, atol=0
    )
    assert _update_relative_error(case, got["weights"], want["weights"]) < weight_tol
    if case.optimizer == "sgd":
        for key, value in want["weights"].items():
            torch.testing.assert_close(got["weights"][key], value, rtol=1e-6, atol=1e-7, msg=key)


@pytest.mark.parametrize(("world", "case"), MATRIX, ids=IDS)
def test_every_rank_computes_with_the_same_master_weights(sharded, world, case):
    per_rank = [results[case.name] for results in sharded(world)]
    assert all(r["model_matches_master"] for r in per_rank)
    assert len({r["weights_checksum"] for r in per_rank}) == 1


@pytest.mark.parametrize("world", sorted(CASES))
@pytest.mark.parametrize("model", MODEL_NAMES)
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
        for stage in (1, 2):
            per_rank = [r[names[stage]]["state_numel"] for r in results]
            # Each rank holds exactly its 1/N of the (padded) flat buffers; padding stays under 2%.
            assert per_rank == [tensors_per_element * results[0][names[stage]]["flat_numel"] // world] * world
            assert per_rank[0] * world <= 1.02 * unsharded


@pytest.mark.parametrize(("world", "case"), MATRIX, ids=IDS)
def test_bytes_sent_per_step_match_data_parallel(sharded, world, case):
    got = sharded(world)[0][case.name]
    padded, size = got["flat_numel"], got["element_size"]
    assert padded <= 1.02 * got["param_count"]
    share = (world - 1) / world
    # DDP's all-reduce sends 2Ψ(W-1)/W; stage 2 reduce-scatters every micro-batch, then all-gathers.
    gradient_passes = case.accumulation if case.stage == 2 else 1
    expected = round((gradient_passes + 1) * share * padded * size)
    if case.clipping > 0 and case.stage > 0:
        expected += round(2 * share * 4)  # the all-reduced fp32 squared norm
    assert got["comm_bytes"] == [expected] * case.steps


@pytest.mark.parametrize("world", sorted(CASES))
def test_stage2_never_holds_a_full_gradient(sharded, world):
    """Stage 2 stages gradients per bucket: at most a few buckets' worth are alive at once."""
    for case in CASES[world]:
        if case.stage != 2:
            continue
        got = sharded(world)[0][case.name]
        assert got["peak_staged_elements"] > 0
        assert got["peak_staged_elements"] <= 0.5 * got["flat_numel"], case.name
