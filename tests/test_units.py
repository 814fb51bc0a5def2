"""Units: which module subtrees are laid out (and at stage 3 gathered) together."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import hf_zero
from hf_zero.core.units import ROOT, find_units
from hf_zero.testing.tiny_models import build_model


def _names(units):
    return [(unit.name, len(unit.params)) for unit in units]


def test_units_are_the_models_layer_classes_and_the_rest_is_the_root():
    # Llama's untied input embedding is a unit of its own, first, and its untied head one, last; the
    # final norm is the root.
    llama = build_model("llama")
    units = find_units(llama)
    assert _names(units) == [
        (ROOT, 1),
        ("model.embed_tokens", 1),
        ("model.layers.0", 9),
        ("model.layers.1", 9),
        ("lm_head", 1),
    ]
    assert units[1].params[0] is llama.model.embed_tokens.weight
    assert units[-1].params[0] is llama.lm_head.weight
    assert [id(p) for p in units[0].params] == [id(llama.model.norm.weight)]
    # Naming the layer classes keeps exactly those (the embedding goes back to the root).
    assert _names(find_units(llama, ["LlamaDecoderLayer"]))[0] == (ROOT, 3)
    # Under Liger-Kernel's forward (its fused loss reads lm_head.weight without running lm_head) the
    # head stays in the root. (Liger patches modules process-wide: only its mark is copied here.)
    liger = build_model("llama")

    def lce_forward(*args, **kwargs):
        raise AssertionError("not run")

    lce_forward.__module__ = "liger_kernel.transformers.model.llama"
    liger.forward = lce_forward
    assert [unit.name for unit in find_units(liger)][-1] == "model.layers.1"
    assert any(p is liger.lm_head.weight for p in find_units(liger)[0].params)
    # GPT-2 ties lm_head to wte: one parameter, in the root unit.
    assert _names(find_units(build_model("gpt2"))) == [
        (ROOT, 4),
        ("transformer.h.0", 12),
        ("transformer.h.1", 12),
    ]
    # BERT's MLM head (outside every unit) is tied to the word embeddings (inside a unit): root.
    bert = build_model("bert")
    units = find_units(bert)
    assert any(p is bert.bert.embeddings.word_embeddings.weight for p in units[0].params)
    # A layer reused three times is one unit.
    assert _names(find_units(build_model("llama-shared"))) == [
        (ROOT, 1), ("model.embed_tokens", 1), ("model.layers.0", 9), ("lm_head", 1)
    ]  # fmt: skip


def test_units_without_layer_classes_are_the_top_level_children_or_what_the_config_names():
    model = build_model("branches")
    assert _names(find_units(model)) == [
        (ROOT, 0), ("embed", 1), ("trunk", 2), ("branches.0", 4), ("branches.1", 4), ("head", 2)
    ]  # fmt: skip
    assert _names(find_units(model, ["Sequential"])) == [(ROOT, 5), ("branches.0", 4), ("branches.1", 4)]
    with pytest.raises(ValueError, match=r"unit_classes=\['NoSuchLayer'\] matches no module of BranchNet"):
        find_units(model, ["NoSuchLayer"])


def test_a_parameter_shared_by_two_units_belongs_to_the_root():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(nn.Sequential(shared, nn.ReLU()), nn.Sequential(nn.Linear(4, 4), shared))
    units = find_units(model, ["Sequential"])
    root = units[0]
    assert {id(p) for p in root.params} == {id(shared.weight), id(shared.bias)}
    assert sum(len(u.params) for u in units) == len(list(model.parameters()))


@pytest.mark.parametrize(
    ("config", "segments"),
    [
        # Below stage 3 one segment per param group spans the units (CPU offload too); stage 3 and
        # NVMe offload cut them per unit as well (gathered, or swapped, unit by unit).
        ({"stage": 2}, [(0, 0), (0, 1)]),
        ({"stage": 1, "offload_optimizer": "cpu"}, [(0, 0), (0, 1)]),
        ({"stage": 3}, [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]),
        ({"stage": 2, "offload_optimizer": "nvme"}, [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]),
    ],
)
def test_segments_follow_param_groups_and_at_stage_3_units(config, segments, tmp_path):
    if config.get("offload_optimizer") == "nvme":
        config = {**config, "nvme_path": str(tmp_path)}
    model = build_model("gpt2")
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    vectors = [p for p in model.parameters() if p.dim() < 2]
    engine = hf_zero.initialize(model, torch.optim.AdamW([{"params": matrices}, {"params": vectors}]), config)
    assert [(g.unit, g.optimizer_group) for g in engine.groups] == segments
    with pytest.raises(ValueError, match="unit_classes"):
        hf_zero.ZeroConfig(unit_classes=[3])


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.linear(x))


class _ReversedBlocks(nn.Module):
    """Registers `first` before `second` but runs them the other way round."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = _Block(), _Block()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.first(self.second(x))


def test_stage3_warns_when_units_run_out_of_registration_order_and_still_computes_right():
    torch.manual_seed(0)
    model = _ReversedBlocks()
    reference = _ReversedBlocks()
    reference.load_state_dict(model.state_dict())
    x = torch.randn(3, 8)
    engine = hf_zero.initialize(
        model, torch.optim.SGD(model.parameters(), lr=0.1), {"stage": 3, "unit_classes": ["_Block"]}
    )
    with pytest.warns(UserWarning, match=r"unit 'first' ran after units registered later"):
        out = engine(x)
    torch.testing.assert_close(out, reference(x), rtol=0, atol=0)
    out.sum().backward()
    reference(x).sum().backward()
    grads = {n: hf_zero.full_grad(p) for n, p in model.named_parameters()}
    for name, param in reference.named_parameters():
        torch.testing.assert_close(grads[name], param.grad, rtol=0, atol=0)
