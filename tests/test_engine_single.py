"""The engine in one process (world size 1): API contract, errors, accumulation and state, on the
`device` fixture's device (conftest.py: the CPU, or the GPU with `--device cuda`)."""

from __future__ import annotations

import copy

import pytest
import torch

import hf_zero
from hf_zero.testing.tiny_models import build_model, make_samples, slice_samples


def _samples(name: str, count: int, device: torch.device) -> dict[str, torch.Tensor]:
    return {key: value.to(device) for key, value in make_samples(name, count).items()}


def _gpt2_and_sgd(device):
    model = build_model("gpt2").to(device)
    return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def _gpt2_and_adamw(device, **optimizer_kwargs):
    model = build_model("gpt2").to(device)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3, **optimizer_kwargs)


@pytest.mark.parametrize(
    ("config", "error", "message"),
    [
        (
            {
                "offload_params": "nvme",
                "offload_optimizer": "cpu",
                "nvme_path": "/no/such/folder",
                "stage": 3,
            },
            FileNotFoundError,
            "nvme_path='/no/such/folder' is not an existing folder",
        ),
    ],
)
def test_configs_that_cannot_run_here_say_so(config, error, message, device):
    model, optimizer = _gpt2_and_adamw(device)
    with pytest.raises(error, match=message):
        hf_zero.initialize(model, optimizer, config)


class Lamb(torch.optim.Optimizer):
    def __init__(self, params):
        super().__init__(params, {"lr": 1e-3})


class MyElementwise(torch.optim.SGD):
    pass


def test_optimizers_that_are_not_elementwise_are_refused(device):
    model = build_model("gpt2").to(device)
    with pytest.raises(ValueError, match="LBFGS cannot run on hf_zero's flat shards: it runs a line search"):
        hf_zero.initialize(model, torch.optim.LBFGS(model.parameters()), {})
    with pytest.raises(ValueError, match=r"Lamb cannot run .* per-tensor trust ratio"):
        hf_zero.initialize(model, Lamb(model.parameters()), {})
    with pytest.raises(
        ValueError, match=r"does not know whether .*MyElementwise is elementwise.*allow_untested_optimizer"
    ):
        hf_zero.initialize(model, MyElementwise(model.parameters(), lr=0.1), {})
    engine = hf_zero.initialize(
        model, MyElementwise(model.parameters(), lr=0.1), {"allow_untested_optimizer": True}
    )
    assert isinstance(engine.optimizer, MyElementwise)


def test_optimizer_must_cover_exactly_the_trainable_parameters(device):
    model = build_model("gpt2").to(device)
    params = list(model.parameters())
    with pytest.raises(ValueError, match=r"require grad but are in no param group"):
        hf_zero.initialize(model, torch.optim.SGD(params[1:], lr=0.1), {})
    stranger = torch.nn.Parameter(torch.zeros(3, 2))
    with pytest.raises(ValueError, match=r"tensor of shape \(3, 2\) that is not a parameter of the model"):
        hf_zero.initialize(model, torch.optim.SGD([*params, stranger], lr=0.1), {})


@pytest.mark.parametrize("stage", [2, 3])
def test_engine_keeps_the_users_optimizer_groups_and_hyperparameters(device, stage):
    model = build_model("llama").to(device)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0, "lr": 5e-4}],
        lr=1e-3,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5**step)  # made before initialize
    engine = hf_zero.initialize(model, optimizer, {"stage": stage, "precision": "bf16"})
    assert engine.optimizer is optimizer
    assert [(g["lr"], g["weight_decay"]) for g in optimizer.param_groups] == [(1e-3, 0.1), (5e-4, 0.0)]
    # One flat fp32 master shard per param group, spanning the units below stage 3; at stage 3 one
    # per (unit, param group): the root unit (the final norm), the input embedding and the head
    # (matrices: no norm in them) and the two decoder layers.
    assert [u.name for u in engine.units] == [
        "<root>",
        "model.embed_tokens",
        "model.layers.0",
        "model.layers.1",
        "lm_head",
    ]
    masters = [1, 1] if stage < 3 else [4, 3]
    assert [len(g["params"]) for g in optimizer.param_groups] == masters
    assert all(g["params"][0].dtype == torch.float32 for g in optimizer.param_groups)
    samples = _samples("llama", 2, device)
    engine.backward(engine(**samples).loss)
    engine.step()
    scheduler.step()
    assert [g["lr"] for g in optimizer.param_groups] == [5e-4, 2.5e-4]
    state = optimizer.state_dict()["state"]
    assert sorted(state) == list(range(sum(masters))) and set(state[0]) == {"step", "exp_avg", "exp_avg_sq"}


def test_bf16_parameters_are_views_into_flat_buffers_with_fp32_masters(device):
    model = build_model("llama").to(device)
    original = {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters()}
    engine = hf_zero.initialize(
        model, torch.optim.AdamW(model.parameters()), {"stage": 1, "precision": "bf16"}
    )
    # One flat buffer per param group below stage 3 (spanning the units), each parameter a view into it.
    assert [(g.unit, len(g.params)) for g in engine.groups] == [(0, 21)]
    for group in engine.groups:
        start = group.flat.data_ptr()
        end = start + group.flat.numel() * group.flat.element_size()
        for slot, param in zip(group.layout.slots, group.params, strict=True):
            assert param.dtype == torch.bfloat16 and start <= param.data_ptr() < end, slot.name
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32  # buffers are left alone
    # Masters hold the original fp32 values, not their bf16 rounding.
    full = engine.full_state_dict()
    for name, value in original.items():
        assert full[name].dtype == torch.float32
        assert torch.equal(full[name], value), name


def test_frozen_parameters_are_cast_and_left_alone(device):
    model = build_model("gpt2").to(device)
    model.transformer.wpe.weight.requires_grad_(False)
    frozen = model.transformer.wpe.weight.detach().clone()
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine = hf_zero.initialize(model, torch.optim.AdamW(trainable, lr=1e-2), {"precision": "bf16"})
    engine.backward(engine(**_samples("gpt2", 2, device)).loss)
    engine.step()
    assert model.transformer.wpe.weight.dtype == torch.bfloat16
    assert torch.equal(model.transformer.wpe.weight.float(), frozen.to(torch.bfloat16).float())


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_accumulation_and_zero_grad(stage, device):
    # SGD: linear in the gradient, so accumulation errors show in full (Adam's first step is
    # about sign(g), which turns summation-order noise in near-zero gradients into lr-sized steps).
    samples = _samples("gpt2", 4, device)
    reference, optimizer = _gpt2_and_sgd(device)
    reference_engine = hf_zero.initialize(reference, optimizer, {"stage": stage})
    reference_engine.backward(reference_engine(**samples).loss)
    reference_engine.step()

    model, optimizer = _gpt2_and_sgd(device)
    engine = hf_zero.initialize(model, optimizer, {"stage": stage})
    engine.backward(engine(**slice_samples(samples, 0, 1)).loss * 10)  # discarded below
    engine.zero_grad()
    for start in (0, 2):
        engine.backward(engine(**slice_samples(samples, start, 2)).loss / 2)
        assert all(p.grad is None for p in model.parameters())  # the hooks took every gradient
    engine.step()
    assert engine.global_steps == 1
    got, want = engine.full_state_dict(), reference_engine.full_state_dict()
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_plain_pytorch_loop_with_optimizer_step_and_loss_backward(device):
    samples = _samples("gpt2", 2, device)
    model, optimizer = _gpt2_and_adamw(device)
    reference = copy.deepcopy(model)
    # On the CPU the engine's AdamW step is torch's fused one (the default foreach AdamW differs by
    # a few 1e-6 where a gradient is only rounding noise, e.g. the attention's key bias).
    reference_optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-3, fused=True)
    hf_zero.initialize(model, optimizer, {"stage": 2})
    for _ in range(2):
        optimizer.zero_grad()
        model(**samples).loss.backward()
        optimizer.step()
        reference_optimizer.zero_grad()
        reference(**samples).loss.backward()
        reference_optimizer.step()
    for (name, got), want in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=name)


def test_clip_grad_norm_matches_torch_and_blocks_further_backward(device):
    samples = _samples("gpt2", 2, device)
    model, optimizer = _gpt2_and_adamw(device)
    reference = copy.deepcopy(model)
    engine = hf_zero.initialize(model, optimizer, {"stage": 2})
    engine.backward(engine(**samples).loss)
    reference(**samples).loss.backward()
    want = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.1)
    got = engine.clip_grad_norm_(0.1)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    with pytest.raises(RuntimeError, match="gradients were already reduced \\(by clip_grad_norm_\\)"):
        engine.backward(engine(**samples).loss)
    engine.step()
    assert engine.get_global_grad_norm() is got


def test_full_state_dict_restores_dtypes_and_shares_tied_weights(device):
    model = build_model("gpt2").to(device, torch.bfloat16)
    engine = hf_zero.initialize(model, torch.optim.SGD(model.parameters(), lr=0.1), {"precision": "fp32"})
    assert model.transformer.h[0].mlp.c_fc.weight.dtype == torch.float32  # computes in fp32 now
    state = engine.full_state_dict()
    assert state["lm_head.weight"] is state["transformer.wte.weight"]
    assert all(v.device.type == "cpu" for v in state.values())
    assert {v.dtype for v in state.values() if v.is_floating_point()} == {torch.bfloat16}
    assert state.keys() == model.state_dict().keys()


def test_initialize_twice_is_refused(device):
    model, optimizer = _gpt2_and_adamw(device)
    hf_zero.initialize(model, optimizer, {})
    with pytest.raises(ValueError, match="already managed by an hf_zero engine"):
        hf_zero.initialize(model, torch.optim.SGD(model.parameters(), lr=0.1), {})


def test_checkpoint_round_trip_in_bf16(tmp_path, device):
    samples = _samples("gpt2", 2, device)
    model, optimizer = _gpt2_and_adamw(device)
    engine = hf_zero.initialize(model, optimizer, {"stage": 2, "precision": "bf16"})
    engine.backward(engine(**samples).loss)
    engine.step()
    engine.save_checkpoint(tmp_path / "checkpoint")
    weights = engine.full_state_dict()

    restored_model, restored_optimizer = _gpt2_and_adamw(device)
    restored = hf_zero.initialize(restored_model, restored_optimizer, {"stage": 2, "precision": "bf16"})
    restored.load_checkpoint(tmp_path / "checkpoint")
    assert restored.global_steps == 1
    for key, value in weights.items():
        assert torch.equal(restored.full_state_dict()[key], value), key
    live = {key: value.cpu() for key, value in restored_model.state_dict().items()}
    assert all(
        torch.equal(live[k], v.to(torch.bfloat16)) for k, v in weights.items() if v.is_floating_point()
    )
    for engine_ in (engine, restored):
        engine_.backward(engine_(**samples).loss)
        engine_.step()
    assert torch.equal(
        restored.full_state_dict()["lm_head.weight"], engine.full_state_dict()["lm_head.weight"]
    )


@pytest.mark.parametrize("reentrant", [True, False])
@pytest.mark.parametrize("stage", [1, 2])
def test_activation_checkpointing(reentrant, stage, device):
    samples = _samples("llama", 4, device)
    model = build_model("llama").to(device)
    reference = copy.deepcopy(model)
    # Newer transformers renamed gradient checkpointing to activation checkpointing.
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.train()
    engine = hf_zero.initialize(
        model, torch.optim.SGD(model.parameters(), lr=0.1), {"stage": stage, "reduce_bucket_size": 3000}
    )
    reference_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    for _ in range(2):
        engine.backward(engine(**samples).loss)
        engine.step()
        reference(**samples).loss.backward()
        reference_optimizer.step()
        reference_optimizer.zero_grad()
    got = engine.full_state_dict()
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(got[key], value.cpu(), rtol=1e-6, atol=1e-7, msg=key)


def test_full_state_dict_keep_false_returns_nothing(device):
    model, optimizer = _gpt2_and_adamw(device)
    engine = hf_zero.initialize(model, optimizer, {"stage": 1})
    assert engine.full_state_dict(keep=False) == {}
    assert engine.full_state_dict().keys() == model.state_dict().keys()


@pytest.mark.parametrize("stage", [0, 2])
def test_load_full_state_dict_sets_masters_exactly(tmp_path, stage, device):
    source = build_model("gpt2")
    source.save_pretrained(tmp_path)  # ties: writes transformer.wte.weight once
    from hf_zero.hub.weights import load_pretrained_weights

    weights = load_pretrained_weights(tmp_path)
    model, optimizer = _gpt2_and_adamw(device)
    engine = hf_zero.initialize(model, optimizer, {"stage": stage, "precision": "bf16"})
    engine.load_full_state_dict(weights)
    got = engine.full_state_dict()
    for key, value in source.state_dict().items():
        assert torch.equal(got[key], value), key
    assert torch.equal(
        model.transformer.h[0].attn.c_attn.weight.cpu(), source.transformer.h[0].attn.c_attn.weight.bfloat16()
    )

    with pytest.raises(ValueError, match=r"no entry for parameter transformer.wte.weight / lm_head.weight"):
        engine.load_full_state_dict({k: v for k, v in weights.items() if "wte" not in k})
    wrong = {**weights, "transformer.ln_f.bias": torch.zeros(3)}
    with pytest.raises(
        ValueError, match=r"transformer.ln_f.bias has shape \(64,\) but the weights to load hold \(3,\)"
    ):
        engine.load_full_state_dict(wrong)
    with pytest.raises(ValueError, match="entries the model does not have: \\['extra'\\]"):
        engine.load_full_state_dict({**weights, "extra": torch.zeros(1)})
    # A refused load changed nothing.
    assert all(torch.equal(engine.full_state_dict()[k], v) for k, v in got.items())


def test_load_pretrained_weights_needs_a_pretrained_folder(tmp_path):
    from hf_zero.hub.weights import load_pretrained_weights

    with pytest.raises(FileNotFoundError, match="expected a folder written by save_pretrained"):
        load_pretrained_weights(tmp_path)
    build_model("llama").save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert load_pretrained_weights(tmp_path).keys() == build_model("llama").state_dict().keys()
