"""`ZeroConfig.reduce_dtype="fp32"`: bf16 training whose gradients are summed over ranks in fp32, on 4
gloo ranks at stages 1-3 (`hf_zero.testing.step_checks`), against the same runs reducing in bf16
and against unsharded fp32 training of the same global batch."""

from __future__ import annotations

import json

import pytest
import torch

from hf_zero.testing.cases import Case
from hf_zero.testing.launch import torchrun
from hf_zero.testing.tiny_models import build_model
from hf_zero.testing.unsharded import run_unsharded

STEPS, WORLD = 12, 4
STAGES = (1, 2, 3)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("reduce_dtype")
    jobs = [
        {"name": f"s{stage}_{reduce}", "stage": stage, "precision": "bf16", "steps": STEPS,
         "config": {"reduce_dtype": reduce}}
        for stage in STAGES
        for reduce in ("auto", "fp32")
    ]  # fmt: skip
    (out / "jobs.json").write_text(json.dumps(jobs))
    torchrun("hf_zero.testing.step_checks", WORLD, [str(out / "jobs.json"), str(out)])
    return {
        job["name"]: [torch.load(out / f"{job['name']}.rank{r}.pt", weights_only=False) for r in range(WORLD)]
        for job in jobs
    }


def _error(weights: dict, reference: dict) -> float:
    """‖w − w_ref‖ / ‖w_ref − w_init‖: the error relative to what training moved."""
    initial = build_model("gpt2").state_dict()
    diff = torch.cat([(weights[k].float() - v).flatten() for k, v in reference.items()])
    moved = torch.cat([(v - initial[k].float()).flatten() for k, v in reference.items()])
    return (diff.norm() / moved.norm()).item()


@pytest.mark.parametrize("stage", STAGES)
def test_fp32_reduction_keeps_fp32_gradients_and_trains_like_bf16(runs, stage):
    reference = run_unsharded(Case(model="gpt2", stage=0, steps=STEPS, micro_batch=2), WORLD)
    bf16, fp32 = runs[f"s{stage}_auto"], runs[f"s{stage}_fp32"]
    for rank in range(WORLD):
        # The gradient buffers (and so the reduction) are fp32: twice the bytes of bf16 ones.
        assert fp32[rank]["memory"]["gradients"] == 2 * bf16[rank]["memory"]["gradients"] > 0
    assert fp32[0]["losses"][-1] < 0.95 * fp32[0]["losses"][0]  # training moved
    torch.testing.assert_close(
        torch.tensor(fp32[0]["losses"]), torch.tensor(reference["losses"]), rtol=1e-2, atol=0
    )
    # bf16 compute dominates the error against fp32 training (~5%); summing in fp32 changes the
    # weights (it is not a no-op) without making them worse.
    assert any(not torch.equal(fp32[0]["weights"][k], v) for k, v in bf16[0]["weights"].items())
    error_bf16 = _error(bf16[0]["weights"], reference["weights"])
    error_fp32 = _error(fp32[0]["weights"], reference["weights"])
    assert error_fp32 < 1.1 * error_bf16 and error_fp32 < 0.08
