"""The fused Adam/AdamW Triton kernel against its PyTorch reference and torch.optim: on the GPU with
`--device cuda`, else on CPU through Triton's interpreter (TRITON_INTERPRET=1, conftest.py)."""

from __future__ import annotations

import pytest
import torch

from hf_zero.kernels.adamw import AdamHyperparams, adam_step_reference, adam_step_triton

pytestmark = pytest.mark.usefixtures("needs_triton")

SIZES = [1, 1000, 2048, 4097, 10_001]  # below, at and across block boundaries


def _inputs(n, grad_dtype, seed, device):
    generator = torch.Generator().manual_seed(seed)
    param = torch.randn(n, generator=generator)
    grad = (torch.randn(n, generator=generator) * 1e-2).to(grad_dtype)
    exp_avg = torch.randn(n, generator=generator) * 1e-3
    exp_avg_sq = torch.rand(n, generator=generator) * 1e-5
    return tuple(t.to(device) for t in (param, grad, exp_avg, exp_avg_sq))


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize(
    ("decoupled", "weight_decay", "grad_dtype", "out_dtype", "scaled", "zero_grad"),
    [
        (True, 0.01, torch.float32, torch.bfloat16, True, True),
        (True, 0.0, torch.bfloat16, torch.bfloat16, False, False),
        (False, 0.1, torch.float32, None, True, False),
        (False, 0.0, torch.float16, torch.float16, False, True),
        (True, 0.05, torch.float32, torch.float32, True, True),
    ],
)
def test_kernel_matches_reference(
    n, decoupled, weight_decay, grad_dtype, out_dtype, scaled, zero_grad, device
):
    hp = AdamHyperparams(
        lr=3e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=weight_decay, step=7, decoupled=decoupled
    )
    scale = torch.tensor(0.37, device=device) if scaled else None
    results = []
    for step in (adam_step_reference, adam_step_triton):
        param, grad, exp_avg, exp_avg_sq = _inputs(n, grad_dtype, seed=n, device=device)
        out = (
            None if out_dtype is None else torch.full((n,), float("nan"), dtype=out_dtype, device=device)
        )  # poisoned
        step(param, grad, exp_avg, exp_avg_sq, out, hp, scale, zero_grad)
        results.append((param, grad, exp_avg, exp_avg_sq, out))
    (p0, g0, m0, v0, _), (p1, g1, m1, v1, o1) = results
    torch.testing.assert_close(p1, p0, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(m1, m0, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(v1, v0, rtol=1e-6, atol=1e-12)
    assert torch.equal(g1, g0)  # zeroed, or untouched
    if out_dtype is not None:
        assert not torch.isnan(o1).any()
        # The 16-bit copy is the updated master rounded to nearest: at most one rounding apart.
        torch.testing.assert_close(o1, p1.to(out_dtype), rtol=0, atol=0)


@pytest.mark.parametrize("optimizer_class", [torch.optim.AdamW, torch.optim.Adam])
def test_kernel_steps_like_torch_optim(optimizer_class, device):
    n, steps = 3001, 4
    param, _, _, _ = _inputs(n, torch.float32, seed=1, device=device)
    reference = torch.nn.Parameter(param.clone())  # torch.optim on the same device
    optimizer = optimizer_class([reference], lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)
    exp_avg, exp_avg_sq = torch.zeros(n, device=device), torch.zeros(n, device=device)
    for step in range(1, steps + 1):
        gradient = torch.randn(n, generator=torch.Generator().manual_seed(step)).to(device)
        reference.grad = gradient.clone()
        optimizer.step()
        hp = AdamHyperparams(1e-2, 0.8, 0.99, 1e-6, 0.1, step, decoupled=optimizer_class is torch.optim.AdamW)
        adam_step_triton(param, gradient, exp_avg, exp_avg_sq, None, hp)
    state = optimizer.state[reference]
    torch.testing.assert_close(param, reference.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(exp_avg, state["exp_avg"], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(exp_avg_sq, state["exp_avg_sq"], rtol=1e-5, atol=1e-9)


def test_bf16_copy_rounds_to_nearest_even_and_keeps_nan(device):
    values = torch.tensor([1.0 + 2**-8, 1.0 + 3 * 2**-8, -(1.0 + 2**-8) - 2**-20, float("nan"), float("inf")])
    values = values.to(device)
    hp = AdamHyperparams(lr=0.0, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, step=1, decoupled=True)
    out = torch.empty(5, dtype=torch.bfloat16, device=device)
    zeros = [torch.zeros(5, device=device) for _ in range(3)]
    adam_step_triton(values.clone(), *zeros, out, hp)
    expected = values.to(torch.bfloat16)
    assert torch.equal(out[:3], expected[:3]) and torch.isnan(out[3]) and torch.isinf(out[4])


def test_bad_shapes_and_dtypes_are_refused():
    hp = AdamHyperparams(1e-3, 0.9, 0.999, 1e-8, 0.0, 1, True)
    n = 10
    with pytest.raises(ValueError, match="exp_avg must be contiguous with 10 elements"):
        adam_step_triton(torch.zeros(n), torch.zeros(n), torch.zeros(n + 1), torch.zeros(n), None, hp)
    with pytest.raises(ValueError, match="must be float32"):
        adam_step_triton(
            torch.zeros(n, dtype=torch.float64), torch.zeros(n), torch.zeros(n), torch.zeros(n), None, hp
        )


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("zero_grad", [True, False])
def test_a_flagged_step_changes_nothing_but_the_gradient_reset(n, zero_grad, device):
    hp = AdamHyperparams(lr=3e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, step=7, decoupled=True)
    for step in (adam_step_reference, adam_step_triton):
        param, grad, exp_avg, exp_avg_sq = _inputs(n, torch.float16, seed=n, device=device)
        grad[-1] = float("inf")
        before = [t.clone() for t in (param, exp_avg, exp_avg_sq)]
        out = torch.full((n,), 7.0, dtype=torch.float16, device=device)
        step(param, grad, exp_avg, exp_avg_sq, out, hp, None, zero_grad, torch.tensor([1.0], device=device))
        assert all(torch.equal(a, b) for a, b in zip(before, (param, exp_avg, exp_avg_sq), strict=True))
        assert torch.equal(out, torch.full_like(out, 7.0))
        assert torch.equal(grad, torch.zeros_like(grad)) == zero_grad
        # A zero flag is an ordinary step.
        flagged_off = _inputs(n, torch.float16, seed=n, device=device)
        plain = _inputs(n, torch.float16, seed=n, device=device)
        step(*flagged_off, None, hp, None, False, torch.zeros(1, device=device))
        step(*plain, None, hp)
        assert all(torch.equal(a, b) for a, b in zip(flagged_off, plain, strict=True))
