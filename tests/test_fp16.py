"""fp16 with dynamic loss scaling on 2 and 4 gloo ranks, and the loss scaler's rules.

Training runs (`hf_zero.testing.step_checks`) compare fp16 against unsharded fp32 training over
30 steps of the tiny GPT-2 on Markov-chain data (the loss falls by a sixth), and inject an
overflow into one gradient element on ONE rank to check that every rank skips the step, leaves
weights and optimizer state bit-identical and backs the scale off per the hysteresis.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch

import hf_zero
from hf_zero.config.zero_config import ZeroConfig
from hf_zero.engine.loss_scaler import LossScaler
from hf_zero.testing.cases import Case
from hf_zero.testing.launch import torchrun
from hf_zero.testing.tiny_models import build_model, make_samples, slice_samples
from hf_zero.testing.unsharded import run_unsharded

STEPS = 30
# Started at 2**16, the scale meets an overflow or two within these steps (skipped, as it should be);
# the step-for-step comparison with fp32 starts lower, where this run never overflows.
COMPARED = {"steps": STEPS, "config": {"initial_scale_power": 12}}
OVERFLOW = {"steps": 6, "overflow_at": {"3": 1, "4": 1}}  # two overflows in a row, from rank 1
# Started above fp16's range with hysteresis 1, the scale halves on each overflow until it settles
# (at 2**17 on one process: four halvings, then eight steps at the settled scale).
SETTLE = {"steps": 12, "config": {"initial_scale_power": 21, "hysteresis": 1, "loss_scale_window": 1000}}

QGZ = {"node_size": 2, "quantized_gradients": "int8", "quantization_block": 64}

LAUNCHES = {
    1: [{"name": "settle", "stage": 0, "micro_batch": 8, **SETTLE}],  # the global batch of 4 ranks
    2: [
        {"name": "s1", "stage": 1, **COMPARED},
        {"name": "s2_clip", "stage": 2, **COMPARED, "clipping": 1.0},
        {"name": "s3", "stage": 3, **COMPARED},
        {"name": "s2_sgd", "stage": 2, **COMPARED, "optimizer": "sgd"},
        {"name": "s2_overflow", "stage": 2, **OVERFLOW},
        {"name": "s1_overflow_clip", "stage": 1, "clipping": 1.0, **OVERFLOW},
        {"name": "s3_overflow", "stage": 3, **OVERFLOW},
        {"name": "s2_overflow_sgd", "stage": 2, "optimizer": "sgd", **OVERFLOW},
        # RMSprop runs torch's own update: the host reads the flag before it and withholds gradients.
        {"name": "s3_overflow_rmsprop", "stage": 3, "optimizer": "rmsprop", **OVERFLOW},
        # Muon's momentum by element, Adafactor's state whole at the owners: both left alone.
        {"name": "s2_overflow_muon", "stage": 2, "optimizer": "muon", **OVERFLOW},
        {"name": "s3_overflow_adafactor", "stage": 3, "optimizer": "adafactor", **OVERFLOW},
        {
            "name": "s2_window",
            "stage": 2,
            "steps": 7,
            "config": {"loss_scale_window": 3, "initial_scale_power": 10},
        },
        {"name": "s1_static", "stage": 1, "steps": 4, "overflow_at": {"2": 0}, "config": {"loss_scale": 256}},
    ],
    # On 4 ranks the fp16 comparison runs at stage 2 only: stage 3 reduces through the same
    # reducer (its buckets launched per unit) with the same pre-divided loss, which 2 ranks compare.
    4: [
        {"name": "s2_clip", "stage": 2, **COMPARED, "clipping": 1.0},
        {"name": "s2_overflow", "stage": 2, "steps": 6, "overflow_at": {"3": 3, "4": 2}},
        {"name": "s1_settle", "stage": 1, **SETTLE},
        {"name": "s2_settle", "stage": 2, **SETTLE},
        {"name": "s3_settle", "stage": 3, **SETTLE},
        # ZeRO++ on 2 nodes x 2: an inf reaches its owner through the int8 all-to-alls (a NaN scale).
        {"name": "s2_overflow_qgz", "stage": 2, "steps": 6, "overflow_at": {"3": 3, "4": 2}, "config": QGZ},
        {
            "name": "s3_overflow_zeropp",
            "stage": 3,
            "steps": 6,
            "overflow_at": {"3": 3, "4": 2},
            "config": {**QGZ, "quantized_weights": "int8", "hpz_partition_size": 2},
        },
    ],
}


def _launch(world: int, out: Path) -> dict[str, list[dict]]:
    jobs = out / "jobs.json"
    jobs.write_text(json.dumps(LAUNCHES[world]))
    torchrun("hf_zero.testing.step_checks", world, [str(jobs), str(out)])
    return {
        job["name"]: [torch.load(out / f"{job['name']}.rank{r}.pt", weights_only=False) for r in range(world)]
        for job in LAUNCHES[world]
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    launched = {}

    def results(world: int) -> dict[str, list[dict]]:
        if world not in launched:
            launched[world] = _launch(world, tmp_path_factory.mktemp(f"fp16_{world}ranks"))
        return launched[world]

    return results


@functools.cache
def _fp32_reference(world: int, optimizer: str, clipping: float) -> dict:
    case = Case(model="gpt2", stage=0, optimizer=optimizer, clipping=clipping, steps=STEPS, micro_batch=2)
    return run_unsharded(case, world)


def _relative_weight_error(got: dict, want: dict) -> float:
    """‖w_fp16 − w_fp32‖ / ‖w_fp32 − w_init‖: the error relative to what training moved."""
    init = build_model("gpt2").state_dict()
    diff = torch.cat([(got[k].float() - v).flatten() for k, v in want.items()])
    moved = torch.cat([(v - init[k].float()).flatten() for k, v in want.items()])
    return (diff.norm() / moved.norm()).item()


@pytest.mark.parametrize(
    ("world", "name", "optimizer", "clipping", "weight_tol"),
    [
        # Adam divides by the gradient's own size, so fp16 rounding of tiny gradient components
        # moves their weights by up to a few percent of the update; SGD is linear in the gradient.
        (2, "s1", "adamw", 0.0, 0.06),
        (2, "s2_clip", "adamw", 1.0, 0.06),
        (2, "s3", "adamw", 0.0, 0.06),
        (2, "s2_sgd", "sgd", 0.0, 0.005),
        (4, "s2_clip", "adamw", 1.0, 0.06),
    ],
)
def test_fp16_training_matches_fp32_within_fp16_rounding(runs, world, name, optimizer, clipping, weight_tol):
    ranks = runs(world)[name]
    want = _fp32_reference(world, optimizer, clipping)
    got = ranks[0]
    assert all(r["skipped_steps"] == 0 for r in ranks)  # the comparison is step for step
    assert got["losses"][-1] < 0.95 * got["losses"][0]  # the loss really moved
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(want["losses"]), rtol=2e-3, atol=0)
    # The norm clipping sees is of the unscaled gradient (Adam alone would hide a missing unscale).
    torch.testing.assert_close(torch.tensor(got["norms"]), torch.tensor(want["norms"]), rtol=3e-2, atol=0)
    assert got["weights"].keys() == want["weights"].keys()
    assert all(value.dtype == torch.float32 for value in got["weights"].values())  # the fp32 masters
    assert _relative_weight_error(got["weights"], want["weights"]) < weight_tol


@pytest.mark.parametrize(
    ("world", "name"),
    [
        (2, "s2_overflow"),
        (2, "s1_overflow_clip"),
        (2, "s3_overflow"),
        (2, "s2_overflow_sgd"),
        (2, "s3_overflow_rmsprop"),
        (2, "s2_overflow_muon"),
        (2, "s3_overflow_adafactor"),
        (4, "s2_overflow"),
        (4, "s2_overflow_qgz"),
        (4, "s3_overflow_zeropp"),
    ],
)
def test_an_overflow_on_one_rank_skips_the_step_on_every_rank(runs, world, name):
    ranks = runs(world)[name]
    for result in ranks:
        steps = result["steps"]
        assert [s["skipped"] for s in steps] == [s["step"] in (3, 4) for s in steps]
        for step in (3, 4):
            assert steps[step]["identical"], f"step {step} changed weights or optimizer state"
        # hysteresis 2: the first overflow only uses it up, the second halves the scale.
        assert [s["scale_after"] for s in steps[2:6]] == [65536.0, 65536.0, 32768.0, 32768.0]
        assert result["skipped_steps"] == 2
        if name.endswith("overflow") or name.endswith("overflow_clip"):  # Adam: 6 calls, 4 real steps
            assert result["optimizer_steps"] == [4.0]
    # The steps around the overflows trained: the weights moved.
    initial = build_model("gpt2").state_dict()
    weights = ranks[0]["weights"]
    assert sum((value - initial[key].float()).abs().sum().item() for key, value in weights.items()) > 0.1


@pytest.mark.parametrize("name", ["s1_settle", "s2_settle", "s3_settle"])
def test_the_loss_scale_settles_where_unsharded_trainings_does(runs, name):
    # A rank's gradient of its own mean loss is about 4 times its share of the global mean: scaled
    # by the loss scale alone, the sum over 4 ranks settled 2 bits lower than one process with the
    # same global batch (65536, then 32768, against 131072). The engine divides the loss by the
    # world size before backward, so both see the same values.
    unsharded = [s["scale_after"] for s in runs(1)["settle"][0]["steps"]]
    assert runs(1)["settle"][0]["skipped_steps"] >= 3  # it started above the overflow point
    assert unsharded[-6:] == [unsharded[-1]] * 6  # and settled
    for result in runs(4)[name]:
        sharded = [s["scale_after"] for s in result["steps"]]
        assert min(sharded[-6:]) >= unsharded[-1], (sharded, unsharded)
    torch.testing.assert_close(
        torch.tensor(runs(4)[name][0]["losses"]),
        torch.tensor(runs(1)["settle"][0]["losses"]),
        rtol=2e-2,
        atol=0,
    )


def test_the_scale_grows_after_a_clean_window(runs):
    for result in runs(2)["s2_window"]:
        scales = [s["scale_after"] for s in result["steps"]]
        assert scales == [1024.0, 1024.0, 2048.0, 2048.0, 2048.0, 4096.0, 4096.0]


def test_a_static_scale_skips_overflows_but_never_changes(runs):
    for result in runs(2)["s1_static"]:
        assert [s["skipped"] for s in result["steps"]] == [False, False, True, False]
        assert {s["scale_after"] for s in result["steps"]} == {256.0}


# ---- the scaler and the engine in one process (on the `device` fixture's device, conftest.py) -------


def _batch(device: torch.device) -> dict[str, torch.Tensor]:
    return {key: value.to(device) for key, value in slice_samples(make_samples("gpt2", 2), 0, 2).items()}


def _scaler(**fields) -> LossScaler:
    return LossScaler(ZeroConfig(precision="fp16", **fields))


def test_loss_scaler_follows_deepspeed_rules():
    scaler = _scaler(initial_scale_power=4, loss_scale_window=2, hysteresis=2, min_loss_scale=2)
    history = []
    for overflow in [True, True, True, False, False, True, False, True, True, True]:
        scaler.update(overflow)
        history.append(scaler.scale)
    # hysteresis uses up one overflow, then each halves; growth restores the hysteresis.
    assert history == [16, 8, 4, 4, 8, 8, 8, 4, 2, 2]
    assert scaler.skipped_steps == 7


def test_overflowing_at_the_minimum_scale_on_consecutive_steps_raises():
    scaler = _scaler(initial_scale_power=1, hysteresis=1, min_loss_scale=1)
    scaler.update(True)  # 2 -> 1
    scaler.update(True)  # at the minimum, once: still skipped
    scaler.update(False)  # a clean step resets the count
    scaler.update(True)
    with pytest.raises(FloatingPointError, match=r"precision='bf16'.*lower learning rate"):
        scaler.update(True)


def test_the_min_scale_error_reaches_the_training_loop(device):
    model = build_model("gpt2").to(device)
    engine = hf_zero.initialize(
        model,
        torch.optim.AdamW(model.parameters(), lr=1e-3),
        {"stage": 2, "precision": "fp16", "initial_scale_power": 0, "hysteresis": 1},
    )
    batch = _batch(device)
    engine.backward(engine(**batch).loss * float("inf"))
    engine.step()
    assert engine.last_step_skipped and engine.loss_scale == 1.0
    engine.backward(engine(**batch).loss * float("inf"))
    with pytest.raises(FloatingPointError, match="overflowed on 2 steps in a row"):
        engine.step()


def test_plain_loss_backward_is_refused_under_fp16(device):
    model = build_model("gpt2").to(device)
    engine = hf_zero.initialize(model, torch.optim.AdamW(model.parameters(), lr=1e-3), {"precision": "fp16"})
    loss = engine(**_batch(device)).loss
    with pytest.raises(RuntimeError, match=r"call engine.backward\(loss\)"):
        loss.backward()


def test_scaler_state_round_trips_through_state_dict_and_checkpoints(tmp_path, device):
    scaler = _scaler(loss_scale_window=3)
    for overflow in (True, False, True, True, False):
        scaler.update(overflow)
    other = _scaler(loss_scale_window=3)
    other.load_state_dict(json.loads(json.dumps(scaler.state_dict())))
    assert other.state_dict() == scaler.state_dict() != _scaler().state_dict()
    with pytest.raises(ValueError, match="lacks"):
        other.load_state_dict({"scale": 2.0})

    def engine():
        model = build_model("gpt2").to(device)
        config = {"stage": 1, "precision": "fp16", "initial_scale_power": 3, "loss_scale_window": 2}
        return hf_zero.initialize(model, torch.optim.AdamW(model.parameters(), lr=1e-3), config)

    trained = engine()
    batch = _batch(device)
    for poison in (1.0, 1.0, 1.0, float("inf")):
        trained.backward(trained(**batch).loss * poison)
        trained.step()
    assert trained.loss_scale == 16.0 and trained.skipped_steps == 1
    trained.save_checkpoint(tmp_path / "ckpt")
    resumed = engine()
    manifest = resumed.load_checkpoint(tmp_path / "ckpt")
    assert manifest["loss_scaler"] == trained.loss_scaler.state_dict()
    assert resumed.loss_scaler.state_dict() == trained.loss_scaler.state_dict()
    assert resumed.loss_scale == 16.0 and resumed.skipped_steps == 1


def test_full_grad_and_clip_grad_norm_report_the_unscaled_gradient(device):
    batch = _batch(device)
    measured = {}
    for precision in ("fp32", "fp16"):
        model = build_model("gpt2").to(device)
        engine = hf_zero.initialize(
            model, torch.optim.AdamW(model.parameters(), lr=1e-3), {"precision": precision}
        )
        engine.backward(engine(**batch).loss)
        weight = model.get_parameter("transformer.h.0.mlp.c_fc.weight")
        measured[precision] = (
            hf_zero.full_grad(weight),
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9),
        )
    (grad32, norm32), (grad16, norm16) = measured["fp32"], measured["fp16"]
    assert norm16.item() == pytest.approx(norm32.item(), rel=1e-2)
    assert ((grad16 - grad32).norm() / grad32.norm()).item() < 1e-2
