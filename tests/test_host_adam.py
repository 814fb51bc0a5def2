"""The host update of optimizer offload: torch's fused CPU Adam/AdamW behind `adam_step` on CPU
tensors, against the reference step (which the Triton kernel is tested against), and the chunks
the shard streams through."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from hf_zero.core.device import DeviceOps
from hf_zero.core.layout import Run
from hf_zero.kernels.adamw import AdamHyperparams, adam_step, adam_step_reference, adam_step_torch_cpu
from hf_zero.offload.host_staging import HostStaging


def _inputs(n: int, seed: int, grad_dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [
        torch.randn(n, generator=generator),
        (torch.randn(n, generator=generator) * 1e-2).to(grad_dtype),
        torch.randn(n, generator=generator) * 1e-3,
        torch.rand(n, generator=generator) * 1e-5,
    ]


@pytest.mark.parametrize("n", [1, 4097, 100_003])
@pytest.mark.parametrize(
    ("decoupled", "weight_decay", "grad_dtype", "out_dtype", "scaled", "zero_grad"),
    [
        (True, 0.01, torch.float32, torch.bfloat16, True, True),
        (True, 0.0, torch.float32, torch.float16, False, False),
        (False, 0.1, torch.float32, None, True, False),
        (False, 0.0, torch.float32, torch.float32, True, True),
        (True, 0.01, torch.bfloat16, torch.bfloat16, True, True),  # a CPU run's own 16-bit gradient
        (True, 0.0, torch.float16, None, False, False),
    ],
)
def test_torch_fused_cpu_step_matches_the_reference(
    n, decoupled, weight_decay, grad_dtype, out_dtype, scaled, zero_grad
):
    hp = AdamHyperparams(
        lr=3e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=weight_decay, step=7, decoupled=decoupled
    )
    scale = torch.tensor([0.37]) if scaled else None
    results = []
    for step in (adam_step_reference, adam_step_torch_cpu):
        param, grad, exp_avg, exp_avg_sq = _inputs(n, seed=n, grad_dtype=grad_dtype)
        out = None if out_dtype is None else torch.full((n,), float("nan"), dtype=out_dtype)
        step(param, grad, exp_avg, exp_avg_sq, out, hp, scale, zero_grad)
        results.append((param, grad, exp_avg, exp_avg_sq, out))
    (p0, _, m0, v0, _), (p1, g1, m1, v1, o1) = results
    initial = _inputs(n, seed=n)[0]
    assert (p1 - initial).abs().max() > 1e-4  # the step moved the weights
    torch.testing.assert_close(p1, p0, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(m1, m0, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(v1, v0, rtol=1e-6, atol=1e-12)
    if zero_grad:
        assert not g1.any()
    elif grad_dtype != torch.float32:
        assert torch.equal(g1, _inputs(n, seed=n, grad_dtype=grad_dtype)[1])  # widened, not changed
    if out_dtype is not None:
        assert torch.equal(o1, p1.to(out_dtype))


def test_a_flagged_host_step_changes_nothing_but_the_gradient_reset():
    hp = AdamHyperparams(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1, step=2, decoupled=True)
    param, grad, exp_avg, exp_avg_sq = _inputs(5000, seed=3)
    before = [t.clone() for t in (param, exp_avg, exp_avg_sq)]
    out = torch.zeros(5000, dtype=torch.bfloat16)
    adam_step_torch_cpu(
        param, grad, exp_avg, exp_avg_sq, out, hp, torch.tensor([0.5]), True, torch.tensor([3.0])
    )
    assert all(torch.equal(a, b) for a, b in zip(before, (param, exp_avg, exp_avg_sq), strict=True))
    assert not out.any() and not grad.any()


def test_adam_step_takes_the_torch_path_for_cpu_masters(monkeypatch):
    taken = []
    monkeypatch.setattr("hf_zero.kernels.adamw.adam_step_torch_cpu", lambda *args: taken.append("torch"))
    monkeypatch.setattr("hf_zero.kernels.adamw.adam_step_reference", lambda *args: taken.append("reference"))
    hp = AdamHyperparams(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.0, step=1, decoupled=True)
    param, grad, exp_avg, exp_avg_sq = _inputs(10, seed=0)
    adam_step(param, grad, exp_avg, exp_avg_sq, None, hp)
    adam_step(param, grad.bfloat16(), exp_avg, exp_avg_sq, None, hp)  # a 16-bit gradient on the CPU
    adam_step(param.double(), grad.double(), exp_avg.double(), exp_avg_sq.double(), None, hp)
    assert taken == ["torch", "torch", "reference"]


def test_the_shard_streams_in_chunks_that_fit_the_staging_buffers():
    # Runs of one shard with bucket padding between them (shard elements 5..7 and 20..21 are padding).
    group = SimpleNamespace(runs=[Run(0, 0, 5), Run(8, 100, 12), Run(22, 300, 3)])
    chunks = HostStaging(6, DeviceOps.for_device(torch.device("cpu")))._chunks(group)
    pieces = [(run.shard_start, begin, end) for chunk in chunks for run, begin, end in chunk]
    assert pieces == [(0, 0, 5), (8, 8, 14), (8, 14, 20), (22, 22, 25)]
    for chunk in chunks:  # each chunk's span, padding included, fits one buffer
        assert chunk[-1][2] - chunk[0][1] <= 6
    covered = sorted(i for chunk in chunks for _, begin, end in chunk for i in range(begin, end))
    assert covered == [*range(0, 5), *range(8, 20), *range(22, 25)]
