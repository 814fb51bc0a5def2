"""Ordinary PyTorch calls on a sharded model, in one process: each either reaches the engine or is
refused with an error that names the fix (the multi-rank versions run in the matrix)."""

from __future__ import annotations

import copy

import pytest
import torch

import hf_zero
from hf_zero.core.distributed import choose_device
from hf_zero.testing.tiny_models import build_model, make_samples, slice_samples


def _engine(model_name="gpt2", optimizer=None, **config):
    model = build_model(model_name)
    optimizer = optimizer(model) if optimizer else torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, optimizer, hf_zero.initialize(model, optimizer, config)


def _train_step(engine, samples, backward=None):
    loss = engine(**samples).loss
    (backward or engine.backward)(loss)
    engine.step()


@pytest.mark.parametrize("stage", [0, 1, 2])
@pytest.mark.parametrize("how", ["optimizer", "model"])
def test_zero_grad_of_the_optimizer_or_model_discards_accumulated_gradients(stage, how):
    samples = make_samples("gpt2", 4)
    _reference_model, _, reference = _engine(stage=stage, precision="bf16")
    _train_step(reference, samples)
    model, optimizer, engine = _engine(stage=stage, precision="bf16")
    model(**slice_samples(samples, 0, 1)).loss.mul(10).backward()  # a bad micro-batch ...
    (optimizer if how == "optimizer" else model).zero_grad()  # ... thrown away
    _train_step(engine, samples, backward=lambda loss: loss.backward())
    got, want = engine.full_state_dict(), reference.full_state_dict()
    for key, value in want.items():
        assert torch.equal(got[key], value), key


@pytest.mark.parametrize("stage", [0, 2])
def test_model_load_state_dict_sets_the_masters(stage):
    model, _optimizer, engine = _engine(
        stage=stage, precision="bf16", optimizer=lambda m: torch.optim.SGD(m.parameters(), lr=0.0)
    )
    loaded = {name: torch.full_like(p, 0.01, dtype=torch.float32) for name, p in model.named_parameters()}
    model.load_state_dict(loaded, strict=False)
    model.transformer.h[1].load_state_dict({"ln_2.bias": torch.full((64,), 0.3)}, strict=False)  # a submodule
    _train_step(engine, make_samples("gpt2", 2))  # lr 0: the weights must stay what was loaded
    full = engine.full_state_dict()
    assert torch.equal(full["transformer.h.1.ln_2.bias"], torch.full((64,), 0.3))
    assert torch.equal(full["transformer.h.0.mlp.c_fc.weight"], loaded["transformer.h.0.mlp.c_fc.weight"])
    assert torch.equal(
        model.transformer.h[0].mlp.c_fc.weight, torch.full_like(model.transformer.h[0].mlp.c_fc.weight, 0.01)
    )
    with pytest.raises(ValueError, match=r"assign=True\) would replace parameters"):
        model.load_state_dict(loaded, strict=False, assign=True)


def test_model_state_dict_is_the_compute_copy_and_full_state_dict_the_masters():
    model, _, engine = _engine(stage=2, precision="bf16")
    assert model.state_dict()["lm_head.weight"].dtype == torch.bfloat16
    assert engine.full_state_dict()["lm_head.weight"].dtype == torch.float32


def test_add_param_group_after_initialize_is_refused():
    _model, optimizer, _ = _engine()
    with pytest.raises(RuntimeError, match=r"add_param_group after hf_zero\.initialize is not supported"):
        optimizer.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))]})


@pytest.mark.parametrize(("stage", "segments"), [(1, 1), (3, 3)])  # stage 3: one per unit
def test_optimizer_built_from_named_parameters_stays_consistent(stage, segments):
    _model, optimizer, engine = _engine(
        optimizer=lambda m: torch.optim.AdamW(m.named_parameters(), lr=1e-3), stage=stage
    )
    _train_step(engine, make_samples("gpt2", 2))
    state = optimizer.state_dict()
    assert state["param_groups"][0]["param_names"] == [f"hf_zero.shard.group0.{k}" for k in range(segments)]
    optimizer.load_state_dict(copy.deepcopy(state))
    _train_step(engine, make_samples("gpt2", 2))


@pytest.mark.parametrize("move", [lambda m: m.to(torch.bfloat16), lambda m: m.half(), lambda m: m.double()])
def test_casting_the_model_after_initialize_is_detected_at_the_next_step(move):
    model, _, engine = _engine(stage=2)
    move(model)
    engine.backward(engine(**make_samples("gpt2", 2)).loss)
    with pytest.raises(
        RuntimeError, match=r"parameter transformer.wte.weight no longer lives in hf_zero's flat buffer"
    ):
        engine.step()


def test_close_puts_back_every_function_it_replaced(monkeypatch):
    from hf_zero.engine import user_paths

    monkeypatch.setattr(user_paths, "_CLIP_USERS", 0)  # as if no other engine of this process were open
    model = build_model("llama")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    engines = [hf_zero.initialize(model, optimizer, {"stage": 3})]
    other = build_model("gpt2")
    engines.append(hf_zero.initialize(other, torch.optim.SGD(other.parameters(), lr=0.1), {"stage": 1}))
    replaced = [
        (model, "zero_grad"),
        (model, "generate"),
        (optimizer, "zero_grad"),
        (optimizer, "add_param_group"),
    ]
    assert all(name in vars(target) for target, name in replaced)
    assert torch.nn.utils.clip_grad_norm_._hf_zero_route
    engines[0].close()
    assert not any(name in vars(target) for target, name in replaced)
    assert optimizer.add_param_group.__func__ is torch.optim.Optimizer.add_param_group
    assert torch.nn.utils.clip_grad_norm_._hf_zero_route  # the other engine still routes clipping
    engines[1].close()
    assert not getattr(torch.nn.utils.clip_grad_norm_, "_hf_zero_route", False)
    assert torch.nn.utils.clip_grad.clip_grad_norm_ is torch.nn.utils.clip_grad_norm_


def test_torch_clip_grad_norm_routes_to_the_engine():
    samples = make_samples("gpt2", 2)
    model, _optimizer, engine = _engine(stage=2)
    reference = build_model("gpt2")
    model(**samples).loss.backward()
    reference(**samples).loss.backward()
    want = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.1)
    got = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    assert engine.last_grad_norm is got
    with pytest.raises(RuntimeError, match="already reduced"):  # no backward after clipping
        model(**samples).loss.backward()


def test_torch_clipping_of_sharded_parameters_that_cannot_work_is_refused():
    model, _, _ = _engine(stage=2)
    params = list(model.parameters())
    with pytest.raises(ValueError, match="only some of the parameters hf_zero trains"):
        torch.nn.utils.clip_grad_norm_(params[:3], 1.0)
    with pytest.raises(ValueError, match="2-norm only"):
        torch.nn.utils.clip_grad_norm_(params, 1.0, norm_type=1)
    with pytest.raises(ValueError, match="clip_grad_value_ cannot clip hf_zero's sharded gradients"):
        torch.nn.utils.clip_grad_value_(params, 1.0)
    plain = torch.nn.Linear(2, 2)  # other models are untouched
    plain(torch.ones(1, 2)).sum().backward()
    assert torch.nn.utils.clip_grad_norm_(plain.parameters(), 1e-3) > 0


def test_full_grad_matches_the_unsharded_gradient():
    samples = make_samples("llama", 2)
    model, _, _ = _engine("llama", stage=2)
    reference = build_model("llama")
    model(**samples).loss.backward()
    reference(**samples).loss.backward()
    for name in ("model.embed_tokens.weight", "model.layers.1.mlp.down_proj.weight"):
        torch.testing.assert_close(
            hf_zero.full_grad(model.get_parameter(name)), reference.get_parameter(name).grad
        )
    with pytest.raises(ValueError, match="not a parameter trained by an hf_zero engine"):
        hf_zero.full_grad(torch.nn.Parameter(torch.zeros(2)))


def test_frozen_fp32_weights_are_saved_in_fp32():
    model = build_model("gpt2")
    model.transformer.wpe.weight.requires_grad_(False)
    original = model.transformer.wpe.weight.detach().clone()
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine = hf_zero.initialize(model, torch.optim.AdamW(trainable), {"precision": "bf16"})
    assert model.transformer.wpe.weight.dtype == torch.bfloat16  # computes in bf16 ...
    saved = engine.full_state_dict()["transformer.wpe.weight"]
    assert saved.dtype == torch.float32  # ... and is saved in its own dtype
    assert torch.equal(saved, original.bfloat16().float())
    assert "transformer.wpe.weight" not in engine.full_state_dict(trainable_only=True)


@pytest.mark.parametrize(
    ("stage", "segments"),
    [
        # The router sits in an fp32 segment of its own: beside the one spanning the units below
        # stage 3, in its unit at stage 3 (the sparse layer, unit 3, after the root, the input
        # embedding and the dense layer; the head is unit 4).
        (1, [(0, torch.bfloat16), (0, torch.float32)]),
        (
            3,
            [
                (0, torch.bfloat16),
                (1, torch.bfloat16),
                (2, torch.bfloat16),
                (3, torch.bfloat16),
                (3, torch.float32),
                (4, torch.bfloat16),
            ],
        ),
    ],
)
def test_modules_the_model_keeps_in_fp32_compute_and_train_in_fp32(stage, segments):
    model = build_model("beam")
    router = "model.layers.1.mlp.gate.weight"
    start = model.get_parameter(router).detach().clone()
    engine = hf_zero.initialize(
        model, torch.optim.AdamW(model.parameters(), lr=1e-2), {"precision": "bf16", "stage": stage}
    )
    assert model.get_parameter(router).dtype == torch.float32
    assert model.get_parameter("model.layers.1.mlp.experts.down_proj").dtype == torch.bfloat16
    assert [(g.unit, g.compute_dtype) for g in engine.groups] == segments
    _train_step(engine, make_samples("beam", 2))
    full = engine.full_state_dict()
    assert not torch.equal(full[router], start)
    if stage < 3:  # (stage 3 releases the parameter's storage between uses)
        assert torch.equal(model.get_parameter(router), full[router])  # computes with the master itself


def test_a_checkpoint_resumes_with_other_buckets_and_parameter_order_but_not_other_groups(tmp_path):
    samples = make_samples("gpt2", 2)
    _, _, engine = _engine(stage=2, reduce_bucket_size=6000)
    _train_step(engine, samples)
    engine.save_checkpoint(tmp_path / "checkpoint")
    _train_step(engine, samples)
    expected = engine.full_state_dict()
    _, _, other_buckets = _engine(stage=2, reduce_bucket_size=3000)
    _, _, reordered = _engine(
        stage=2, reduce_bucket_size=6000, optimizer=lambda m: torch.optim.AdamW(list(m.parameters())[::-1])
    )
    # Elements are found by parameter name, whatever their place in the flat buffers.
    for resumed in (other_buckets, reordered):
        resumed.load_checkpoint(tmp_path / "checkpoint")
        _train_step(resumed, samples)
        for name, value in resumed.full_state_dict().items():
            assert torch.equal(value, expected[name]), name
    _, _, regrouped = _engine(
        stage=2,
        reduce_bucket_size=6000,
        optimizer=lambda m: torch.optim.AdamW([{"params": [p]} for p in m.parameters()]),
    )
    with pytest.raises(
        ValueError, match="is in param group 1 of the optimizer but was in group 0 when saved"
    ):
        regrouped.load_checkpoint(tmp_path / "checkpoint")


def test_each_launched_rank_takes_its_own_gpu():
    cuda0, cuda3 = torch.device("cuda", 0), torch.device("cuda", 3)
    cpu = torch.device("cpu")
    # torchrun set LOCAL_RANK=3: GPU 3, even if the script moved every rank's model to cuda:0.
    assert choose_device(True, 8, 3, cuda0) == cuda3
    assert choose_device(True, 8, 3, None) == cuda3
    assert choose_device(True, 2, 3, None) == torch.device("cuda", 1)
    # No launcher: the model's own GPU, else GPU 0; a model on the CPU stays there.
    assert choose_device(True, 8, None, cuda3) == cuda3
    assert choose_device(True, 8, None, None) == cuda0
    assert choose_device(True, 8, 3, cpu) == cpu
    assert choose_device(False, 0, 3, None) == cpu
