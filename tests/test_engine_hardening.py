"""Multi-rank checks of what users do besides plain training (issue 5), beyond the per-case
comparison with unsharded training in test_engine_multirank.py: exact resume, `full_grad`, fp32
accumulation at every stage, ranks on different branches, and a gradient that arrives too late."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from hf_zero.testing.cases import Case
from hf_zero.testing.launch import torchrun
from hf_zero.testing.matrix_cases import ACCUMULATION_CASES, ROUTED_CASES, STAGE3_CASES, USER_PATH_CASES
from hf_zero.testing.tiny_models import build_model
from hf_zero.testing.unsharded import run_unsharded

RESUMED = [case for case in USER_PATH_CASES if case.scenario == "resume"]
PLAIN = [case for case in USER_PATH_CASES if case.loop == "plain"]


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).norm() / want.norm()).item()


@pytest.mark.parametrize("case", RESUMED, ids=[c.name for c in RESUMED])
def test_resume_continues_bit_identically(sharded, case):
    """Saved halfway, rebuilt from scratch and loaded: the rest of training is the same to the bit
    (AdamW(fused=True) state, bf16 masters)."""
    resumed = sharded(2)[0][case.name]
    uninterrupted = sharded(2)[0][Case(**{**case.__dict__, "scenario": ""}).name]
    assert resumed["losses"] == uninterrupted["losses"]
    for key, value in uninterrupted["weights"].items():
        assert torch.equal(resumed["weights"][key], value), key


@pytest.mark.parametrize("case", PLAIN, ids=[c.name for c in PLAIN])
def test_full_grad_is_the_rank_averaged_gradient(sharded, case):
    got = sharded(2)[0][case.name]["full_grads"]
    want = run_unsharded(case, 2)["full_grads"]
    steps = range(case.steps) if case.precision == "fp32" else [0]  # bf16 weights drift after step 0
    for step in steps:
        assert got[step].keys() == want[step].keys()
        for name, value in want[step].items():
            bound = 1e-6 if case.precision == "fp32" else 1e-2
            assert _relative(got[step][name], value) < bound, (step, name)


def test_every_stage_accumulates_bf16_micro_batches_in_fp32(sharded):
    """Eight bf16 micro-batches per step: stages 0 and 1 add them up in fp32 and reduce the fp32
    sum, so the gradient equals fp32 accumulation of the same bf16 micro-batch gradients to fp32
    rounding; stage 2 reduce-scatters each micro-batch in bf16 (one rounding each) and adds them up
    in fp32 (stage 3 the same). Adding up in bf16 would be off by several roundings."""
    errors = {}
    for case in ACCUMULATION_CASES:
        got = sharded(2)[0][case.name]["full_grads"][0]
        want = run_unsharded(case, 2)["full_grads"][0]
        errors[case.stage] = max(_relative(got[name], value) for name, value in want.items())
    assert errors[0] < 1e-6 and errors[1] < 1e-6, errors
    assert errors[2] < 2e-3 and errors[3] < 2e-3, errors


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_on_different_branches_train_both_branches(sharded, world):
    init = build_model("branches").state_dict()
    for case in [
        c for c in ROUTED_CASES if world == 2 or (c.stage, c.optimizer, c.overlap) == (2, "sgd", True)
    ]:
        weights = sharded(world)[0][case.name]["weights"]
        for branch in (0, 1):
            key = f"branches.{branch}.0.weight"
            assert not torch.equal(weights[key], init[key]), (case.name, key)


# Both checks in one 2-rank launch (start-up dominates on the CPU), each check's file(s) when it ends.
CHECKS = {"late_gradient": ["rank0.json", "rank1.json"], "stage3_checks": ["report.json"]}


@pytest.fixture(scope="module")
def checks(tmp_path_factory):
    """`folder(check)`: where the check wrote its files. A check that wrote none re-raises the
    launch's error, with the ranks' output; the checks that finished before it are still checked."""
    out = tmp_path_factory.mktemp("checks")
    arguments = [argument for name in CHECKS for argument in (name, str(out / name))]
    for name in CHECKS:
        (out / name).mkdir()
    try:
        # (A rank whose generation would outrun its peer hangs: the timeout turns that into a failure.)
        torchrun("hf_zero.testing.sequence", 2, arguments, timeout=300)
        failed = None
    except RuntimeError as error:
        failed = error

    def folder(name: str) -> Path:
        if failed is not None and not all((out / name / file).exists() for file in CHECKS[name]):
            raise failed
        return out / name

    return folder


def test_a_gradient_after_its_bucket_was_reduced_is_refused(checks):
    out = checks("late_gradient")
    for rank in range(2):
        report = json.loads((out / f"rank{rank}.json").read_text())
        assert (
            "transformer.ln_f.weight received a gradient after its bucket was already reduced"
            in (report["overlap"]["error"])
        )
        assert "overlap_comm=False" in report["overlap"]["error"]
        # Without overlap the same loop is exact: two backward passes, twice the gradient.
        assert report["no_overlap"]["error"] is None
        assert report["no_overlap"]["max_diff"] == 0.0


def test_stage3_generates_as_unsharded_and_edits_reach_every_rank(checks):
    from hf_zero.testing.stage3_checks import NEW_TOKENS, prompt

    out = checks("stage3_checks")
    report = json.loads((out / "report.json").read_text())
    model = build_model("llama").eval()
    want = {
        tokens: model.generate(prompt(), max_new_tokens=tokens, do_sample=False).tolist()
        for tokens in (NEW_TOKENS - 1, NEW_TOKENS, 2 * NEW_TOKENS)
    }
    assert report["full_state_dict_exact"]
    for rank, outputs in enumerate(report["generate"]):
        assert outputs["block"] == want[NEW_TOKENS]
        for mode in ("per_unit", "auto"):
            assert outputs[f"{mode}-{NEW_TOKENS}"] == want[NEW_TOKENS]
            assert outputs[f"{mode}-{2 * NEW_TOKENS}"] == want[2 * NEW_TOKENS]
            assert outputs[f"{mode}-rank{rank}"] == want[NEW_TOKENS - rank]
    sent = report["gather_bytes"]
    # The tiny model fits: "auto" gathers it once per call (half of it comes from the peer, plus
    # the one-float vote on whether it fits), whatever the number of tokens...
    once = report["model_bytes"] // 2 + 4
    assert sent[f"auto-{NEW_TOKENS}"] == sent[f"auto-{2 * NEW_TOKENS}"] == once
    assert sent["block"] == 0  # (the block gathered it already)
    # ...while unit by unit the gathers grow with every token.
    assert sent[f"per_unit-{2 * NEW_TOKENS}"] > sent[f"per_unit-{NEW_TOKENS}"] > NEW_TOKENS * once // 2
    assert report["modifier_rank_written_everywhere"]

    # The full weights, written unit by unit: a folder from_pretrained loads exactly.
    assert report["saved_single"] == ["model.safetensors"]
    saved = report["saved"]
    assert len(saved["files"]) > 2 and (out / "saved" / "model.safetensors.index.json").is_file()
    assert not (out / "saved" / "model.safetensors").exists()  # the first save's file went
    loaded = AutoModelForCausalLM.from_pretrained(out / "saved").state_dict()
    expected = load_file(out / "expected.safetensors")
    assert loaded.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(loaded[key], value), key
    # model.save_pretrained, called on every rank of a plain loop, writes the same weights and the config.
    via_model = AutoModelForCausalLM.from_pretrained(out / "save_pretrained").state_dict()
    assert via_model.keys() == expected.keys()
    assert all(torch.equal(via_model[key], value) for key, value in expected.items())
    # Rank 0 never held more than one unit and one output file's worth on the host.
    assert saved["peak_host_bytes"] <= max(report["unit_fp32_bytes"]) + report["shard_bytes"]
    assert saved["peak_host_bytes"] < saved["total_size"]


def test_lora_at_stage3_leaves_the_frozen_base_where_it_was(sharded):
    init = build_model("gpt2-lora").state_dict()
    for case in [c for c in STAGE3_CASES if c.model == "gpt2-lora"]:
        got = sharded(2)[0][case.name]
        frozen = {name for name in got["weights"] if "lora_" not in name}
        # Stage 3 shards the frozen base too; below it stays whole on every rank.
        # (lm_head.weight is the tied wte.weight under a second name)
        sharded_base = frozen - {"base_model.model.lm_head.weight"} if case.stage == 3 else set()
        assert set(got["frozen_names"]) == sharded_base
        compute = torch.bfloat16 if case.precision == "bf16" else torch.float32
        for name in frozen:  # what they compute with: their initial value in the compute dtype
            assert torch.equal(got["weights"][name], init[name].to(compute).float()), name
        assert any(
            not torch.equal(got["weights"][n], init[n].float()) for n in got["weights"] if "lora_" in n
        )
