"""The gradient-statistics kernel and the fused SGD kernel against their PyTorch references (and
the SGD reference against torch.optim.SGD): on the GPU with `--device cuda`, else on CPU through
Triton's interpreter (TRITON_INTERPRET=1, conftest.py)."""

from __future__ import annotations

import importlib

import pytest
import torch

from hf_zero.kernels.grad_stats import BLOCK_SIZE, grad_stats, grad_stats_reference, grad_stats_triton
from hf_zero.kernels.sgd import SGDHyperparams, sgd_step_reference, sgd_step_triton

# The module itself (`hf_zero.kernels` exports its function under the same name).
grad_stats_module = importlib.import_module("hf_zero.kernels.grad_stats")

pytestmark = pytest.mark.usefixtures("needs_triton")

SIZES = [1, 1000, 2048, 4097, 10_001]  # below, at and across block boundaries
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _gradient(n: int, dtype: torch.dtype, seed: int, device: torch.device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=generator) * 3).to(dtype).to(device)


# ---- gradient statistics ---------------------------------------------------------------------------


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_grad_stats_matches_reference_on_finite_gradients(n, dtype, device):
    grads = [
        _gradient(n, dtype, seed=n, device=device),
        _gradient(n // 3 + 5, dtype, seed=n + 1, device=device),
    ]
    got, want = grad_stats_triton(grads), grad_stats_reference(grads)
    exact = sum(g.double().square().sum() for g in grads).item()
    assert got[1].item() == want[1].item() == 0
    assert got[0].item() == pytest.approx(exact, rel=1e-5)
    assert want[0].item() == pytest.approx(exact, rel=1e-5)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bad", ["inf", "-inf", "nan"])
def test_grad_stats_counts_non_finite_elements_in_the_last_block(n, dtype, bad, device):
    grad = _gradient(n, dtype, seed=n, device=device)
    grad[-1] = float(bad)
    if n > 3:
        grad[n - 3] = float("nan")
    count = 1 + (n > 3)
    for stats in (grad_stats_triton([grad]), grad_stats_reference([grad]), grad_stats([grad])):
        assert stats[1].item() == count
        assert not torch.isfinite(stats[0])


def test_grad_stats_spreads_large_tensors_over_a_bounded_grid(monkeypatch, device):
    # A small grid stands in for MAX_PROGRAMS (1024): more blocks than programs, so each loops.
    monkeypatch.setattr(grad_stats_module, "MAX_PROGRAMS", 3)
    n = BLOCK_SIZE * grad_stats_module.MAX_PROGRAMS + 3 * BLOCK_SIZE + 17
    grad = _gradient(n, torch.float16, seed=3, device=device)
    grad[-1] = float("inf")
    got = grad_stats_triton([grad])
    assert got[1].item() == 1
    grad[-1] = 0
    exact = grad.double().square().sum().item()
    assert grad_stats_triton([grad])[0].item() == pytest.approx(exact, rel=1e-5)


def test_grad_stats_of_nothing_is_zero():
    assert torch.equal(grad_stats_triton([]), torch.zeros(2))
    assert torch.equal(grad_stats_reference([]), torch.zeros(2))


# ---- SGD -------------------------------------------------------------------------------------------

SGD_CASES = [
    # lr, momentum, dampening, weight_decay, nesterov, first step
    (0.1, 0.9, 0.0, 0.0, False, True),
    (0.1, 0.9, 0.0, 0.01, False, False),
    (0.05, 0.9, 0.0, 0.001, True, False),
    (0.05, 0.8, 0.1, 0.0, False, False),
    (0.2, 0.0, 0.0, 0.05, False, False),
]


def _sgd_inputs(n, grad_dtype, seed, device):
    generator = torch.Generator().manual_seed(seed)
    param = torch.randn(n, generator=generator)
    grad = (torch.randn(n, generator=generator) * 1e-1).to(grad_dtype)
    buffer = torch.randn(n, generator=generator) * 1e-2
    return tuple(t.to(device) for t in (param, grad, buffer))


@pytest.mark.parametrize("n", [1, 4097, 10_001])
@pytest.mark.parametrize("grad_dtype", DTYPES)
@pytest.mark.parametrize("case", SGD_CASES)
def test_sgd_kernel_matches_reference(n, grad_dtype, case, device):
    hp = SGDHyperparams(*case)
    scale = torch.tensor(0.37, device=device)
    out_dtype = torch.float16 if grad_dtype == torch.float16 else torch.bfloat16
    results = []
    for step in (sgd_step_reference, sgd_step_triton):
        param, grad, buffer = _sgd_inputs(n, grad_dtype, seed=n, device=device)
        out = torch.full((n,), float("nan"), dtype=out_dtype, device=device)
        step(param, grad, buffer if hp.momentum else None, out, hp, scale, True)
        results.append((param, grad, buffer, out))
    (p0, g0, b0, _), (p1, g1, b1, o1) = results
    torch.testing.assert_close(p1, p0, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(b1, b0, rtol=1e-6, atol=1e-8)
    assert torch.equal(g1, torch.zeros_like(g1)) and torch.equal(g0, g1)
    assert torch.equal(o1, p1.to(out_dtype))


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("grad_dtype", DTYPES)
def test_a_flagged_sgd_step_changes_nothing_but_the_gradient_reset(n, grad_dtype, device):
    hp = SGDHyperparams(0.1, 0.9, 0.0, 0.01, True, False)
    for step in (sgd_step_reference, sgd_step_triton):
        param, grad, buffer = _sgd_inputs(n, grad_dtype, seed=n, device=device)
        grad[-1] = float("nan")
        before = (param.clone(), buffer.clone())
        step(param, grad, buffer, None, hp, None, True, torch.tensor([2.0], device=device))
        assert torch.equal(param, before[0]) and torch.equal(buffer, before[1])
        assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize(
    "options",
    [
        {"momentum": 0.9},
        {"momentum": 0.9, "nesterov": True, "weight_decay": 0.01},
        {"momentum": 0.8, "dampening": 0.2},
        {"weight_decay": 0.1},
    ],
)
def test_sgd_reference_is_torch_sgd_exactly(options, device):
    n, steps = 3001, 4
    param, _, _ = _sgd_inputs(n, torch.float32, seed=1, device=device)
    reference = torch.nn.Parameter(param.clone())
    optimizer = torch.optim.SGD([reference], lr=0.05, **options)
    buffer = torch.zeros(n, device=device)
    for step in range(steps):
        gradient = torch.randn(n, generator=torch.Generator().manual_seed(step)).to(device)
        reference.grad = gradient.clone()
        optimizer.step()
        hp = SGDHyperparams(
            lr=0.05,
            momentum=options.get("momentum", 0.0),
            dampening=options.get("dampening", 0.0),
            weight_decay=options.get("weight_decay", 0.0),
            nesterov=options.get("nesterov", False),
            first=step == 0,
        )
        sgd_step_reference(param, gradient, buffer if hp.momentum else None, None, hp)
    assert torch.equal(param, reference.detach())
    if options.get("momentum"):
        assert torch.equal(buffer, optimizer.state[reference]["momentum_buffer"])


def test_sgd_bad_inputs_are_refused():
    hp = SGDHyperparams(0.1, 0.9, 0.0, 0.0, False, False)
    with pytest.raises(ValueError, match="momentum needs a momentum_buffer"):
        sgd_step_triton(torch.zeros(4), torch.zeros(4), None, None, hp)
    with pytest.raises(ValueError, match="grad must be contiguous with 4 elements"):
        sgd_step_triton(torch.zeros(4), torch.zeros(5), torch.zeros(4), None, hp)
