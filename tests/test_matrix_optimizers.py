"""Optimizers that are not elementwise, in one process: the chain of optimizers, Muon's owners of
the matrices, optimizers stepped by whole parameter (Adafactor, or any class the config names),
what is refused, and fp16's skipped steps. (Against unsharded training on 2 and 3 ranks: the
multi-rank matrix, `test_engine_multirank.py`; resuming on other world sizes:
`test_checkpoint_resume.py`; ZeroTrainer: `test_trainer.py`.)"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import hf_zero
from hf_zero.core.owners import balance_owners, newton_schulz_cost, owner_spread
from hf_zero.integrations.muon import hidden_matrix_names
from hf_zero.testing.tiny_models import build_model, make_samples, slice_samples


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 8))


def _chain(model: nn.Module) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
    matrices = [p for p in model.parameters() if p.dim() == 2]
    vectors = [p for p in model.parameters() if p.dim() != 2]
    return torch.optim.Muon(matrices, lr=0.02), torch.optim.SGD(vectors, lr=0.1, momentum=0.9)


def test_a_chain_shares_its_optimizers_groups_and_state():
    model = _mlp()
    muon, sgd = _chain(model)
    chain = hf_zero.ChainedOptimizer([muon, sgd])
    assert chain.param_groups[0] is muon.param_groups[0] and chain.param_groups[1] is sgd.param_groups[0]
    # A scheduler on the chain drives each optimizer's own group dicts.
    torch.optim.lr_scheduler.LambdaLR(chain, lambda step: 0.5)
    assert (muon.param_groups[0]["lr"], sgd.param_groups[0]["lr"]) == (0.01, 0.05)
    model(torch.randn(4, 8)).square().mean().backward()
    chain.step()
    assert muon.state is chain.state and sgd.state is chain.state and len(chain.state) == 4
    # Loading a state dict keeps the group dicts the optimizers (and their schedulers) hold.
    other_muon, other_sgd = _chain(model)
    other = hf_zero.ChainedOptimizer([other_muon, other_sgd])
    other.load_state_dict(chain.state_dict())
    assert other.param_groups[0] is other_muon.param_groups[0] and other_muon.param_groups[0]["lr"] == 0.01
    assert other_muon.state is other.state
    momentum = chain.state[model[0].weight]["momentum_buffer"]
    assert torch.equal(other.state[model[0].weight]["momentum_buffer"], momentum)


def test_a_parameter_in_two_chained_optimizers_is_refused():
    model = _mlp()
    with pytest.raises(ValueError, match="give each parameter to one optimizer"):
        hf_zero.ChainedOptimizer(
            [torch.optim.Muon([model[0].weight], lr=0.02), torch.optim.SGD(model.parameters(), lr=0.1)]
        )


def test_muon_with_adamw_gives_muon_the_hidden_matrices_only():
    model = build_model("llama")
    names = hidden_matrix_names(model)
    assert names and all(".layers." in name and name.endswith(".weight") for name in names)
    assert "model.embed_tokens.weight" not in names and "lm_head.weight" not in names
    chain = hf_zero.muon_with_adamw(model, lr=0.03, adamw_lr=1e-3)
    muon, adamw = chain.optimizers
    assert type(muon) is torch.optim.Muon and type(adamw) is torch.optim.AdamW
    assert len(muon.param_groups[0]["params"]) == len(names)
    assert sum(len(g["params"]) for g in chain.param_groups) == sum(1 for _ in model.parameters())


def test_under_the_engine_each_chained_optimizer_steps_the_whole_chain_until_closed():
    model = _mlp()
    muon, sgd = _chain(model)
    engine = hf_zero.initialize(model, [muon, sgd], {"stage": 1})
    assert isinstance(engine.optimizer, hf_zero.ChainedOptimizer)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    engine.backward(model(torch.randn(4, 8)).square().mean())
    sgd.step()  # one of the two: the engine steps every parameter
    assert all(not torch.equal(p, before[name]) for name, p in model.named_parameters())
    assert engine.global_steps == 1
    engine.backward(model(torch.randn(4, 8)).square().mean())
    muon.zero_grad()  # the engine's gradients go, as with the chain's own zero_grad
    assert not engine.grad_sync.pending
    engine.close()
    assert "step" not in vars(muon) and "zero_grad" not in vars(sgd)


def test_one_rank_with_muon_trains_exactly_like_torch():
    """The engine's Muon step (momentum and update on the flat shard, Newton–Schulz on each whole
    matrix) against torch.optim.Muon on the same model, for 3 steps, to the last bit."""
    reference, model = build_model("llama"), build_model("llama")
    hidden = set(hidden_matrix_names(model))

    def optimizers(module: nn.Module) -> list[torch.optim.Optimizer]:
        named = list(module.named_parameters())
        return [
            torch.optim.Muon([p for n, p in named if n in hidden], lr=0.02, weight_decay=0.1),
            torch.optim.SGD([p for n, p in named if n not in hidden], lr=0.05, momentum=0.9),
        ]

    torch_chain = hf_zero.ChainedOptimizer(optimizers(reference))
    engine = hf_zero.initialize(model, optimizers(model), {"stage": 2})
    samples = make_samples("llama", 6)
    for step in range(3):
        batch = slice_samples(samples, 2 * step, 2)
        reference(**batch).loss.backward()
        torch_chain.step()
        torch_chain.zero_grad()
        engine.backward(model(**batch).loss)
        engine.step()
        engine.zero_grad()
    trained = engine.full_state_dict()
    for name, param in reference.named_parameters():
        assert torch.equal(trained[name], param.detach()), name
    engine.close()


def test_an_fp16_step_that_overflows_leaves_muon_weights_and_momentum_alone():
    model = _mlp()
    engine = hf_zero.initialize(model, list(_chain(model)), {"stage": 1, "precision": "fp16"})
    engine.backward(model(torch.randn(4, 8).half()).float().square().mean())
    engine.step()
    master = engine.groups[next(iter(engine.matrix_step.segments))].master
    momentum = engine.optimizer.state[master]["momentum_buffer"].clone()
    weights = master.detach().clone()
    engine.backward(model(torch.randn(4, 8).half()).float().square().mean() * 1e10)  # overflows
    engine.step()
    assert engine.last_step_skipped and engine.skipped_steps == 1
    assert torch.equal(engine.optimizer.state[master]["momentum_buffer"], momentum)
    assert torch.equal(master, weights)
    engine.close()


def test_muon_with_optimizer_offload_is_refused_by_name():
    model = _mlp()
    with pytest.raises(ValueError, match="use offload_optimizer='none' with Muon"):
        hf_zero.initialize(model, list(_chain(model)), {"stage": 2, "offload_optimizer": "cpu"})


def test_an_unknown_optimizer_in_a_chain_names_the_setting_that_allows_it():
    class Custom(torch.optim.SGD):
        pass

    model = _mlp()
    optimizers = [torch.optim.Muon([model[0].weight, model[2].weight], lr=0.02)]
    optimizers.append(Custom([model[0].bias, model[2].bias], lr=0.1))
    with pytest.raises(ValueError, match="allow_untested_optimizer=True"):
        hf_zero.initialize(model, optimizers, {"stage": 1})


def test_owners_spread_newton_schulz_work_evenly_over_eight_ranks():
    """Llama-1.1B's 154 matrices (22 layers of q, k, v, o, gate, up, down) over 8 ranks."""
    hidden, intermediate, kv = 2048, 5632, 256
    layer = [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden)]
    layer += [(intermediate, hidden), (intermediate, hidden), (hidden, intermediate)]
    costs = [newton_schulz_cost(shape) for shape in layer * 22]
    owners = balance_owners(costs, 8)
    assert set(owners) == set(range(8))
    assert owner_spread(costs, owners, 8) < 1.02  # measured 1.017
    assert owner_spread(costs, [0] * len(costs), 8) == 8.0
    assert balance_owners(costs, 8) == owners  # every rank computes the same owners
    assert newton_schulz_cost((intermediate, hidden)) == intermediate * hidden * hidden


class TrustSGD(torch.optim.Optimizer):
    """SGD whose step of each tensor is scaled by that tensor's norm over its gradient's (as LAMB's
    trust ratio): not elementwise, and unknown to hf_zero."""

    def __init__(self, params, lr: float = 0.1) -> None:
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    state = self.state[param]
                    state["steps"] = state.get("steps", 0) + 1
                    ratio = param.norm() / param.grad.norm().clamp(min=1e-12)
                    param.add_(param.grad, alpha=-group["lr"] * float(ratio))
        return None


def test_an_optimizer_the_config_names_is_stepped_whole_at_the_owner_exactly():
    reference, model = _mlp(), _mlp()
    torch_optimizer = TrustSGD(reference.parameters(), lr=0.05)
    with pytest.raises(ValueError, match=r"add 'TrustSGD' to ZeroConfig\.whole_parameter_optimizers"):
        hf_zero.initialize(model, TrustSGD(model.parameters(), lr=0.05), {"stage": 2})
    engine = hf_zero.initialize(
        model, TrustSGD(model.parameters(), lr=0.05), {"stage": 2, "whole_parameter_optimizers": ["TrustSGD"]}
    )
    for step in range(3):
        batch = torch.randn(4, 8, generator=torch.Generator().manual_seed(step))
        reference(batch).square().mean().backward()
        torch_optimizer.step()
        torch_optimizer.zero_grad()
        engine.backward(model(batch).square().mean())
        engine.step()
    trained = engine.full_state_dict()
    for name, param in reference.named_parameters():
        assert torch.equal(trained[name], param.detach()), name
    assert engine.whole_step.states[0]["steps"] == 3
    engine.close()


def test_adafactor_state_is_counted_where_its_owner_keeps_it():
    model = _mlp()
    engine = hf_zero.initialize(model, torch.optim.Adafactor(model.parameters(), lr=1e-2), {"stage": 1})
    assert engine.memory_breakdown()["optimizer_state"] == 0
    engine.backward(model(torch.randn(4, 8)).square().mean())
    engine.step()
    # Factored moments of the two matrices (rows + columns), full ones of the two biases.
    expected = 4 * ((16 + 8) + (8 + 16) + 16 + 8)
    assert engine.memory_breakdown()["optimizer_state"] == engine.whole_step.state_bytes() == expected
    engine.close()


def test_optimizers_that_need_the_whole_parameter_vector_stay_refused():
    model = _mlp()
    with pytest.raises(ValueError, match="line search") as refused:
        hf_zero.initialize(model, torch.optim.LBFGS(model.parameters()), {"stage": 1})
    assert "whole_parameter_optimizers" not in str(refused.value)


def test_zero_trainer_takes_a_list_of_optimizers(tmp_path):
    from transformers import TrainingArguments

    from hf_zero.testing.trainer_run import TensorDataset

    model = build_model("gpt2")
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    chain = hf_zero.muon_with_adamw(model, lr=0.02, adamw_lr=1e-3)
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, report_to=[], use_cpu=True,
        save_strategy="no", disable_tqdm=True,
    )  # fmt: skip
    samples = make_samples("gpt2", 4)
    trainer = hf_zero.ZeroTrainer(
        model=model, args=args, train_dataset=TensorDataset(dict(samples)), optimizers=(chain.optimizers, None),
        zero_config={"stage": 2},
    )  # fmt: skip
    trainer.train()
    engine = trainer.zero_engine
    assert isinstance(engine.optimizer, hf_zero.ChainedOptimizer) and engine.matrix_step is not None
    trained = engine.full_state_dict()
    assert all(not torch.equal(trained[name], value) for name, value in before.items())
    engine.close()
