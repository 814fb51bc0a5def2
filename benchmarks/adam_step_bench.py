"""Optimizer-step bandwidth over one flat fp32 shard: hf_zero's one-pass fused kernel against
torch's fused AdamW plus the passes the engine would otherwise add (clip scale, bf16 copy).

    python benchmarks/adam_step_bench.py [N]        # N elements, default 1e9 (Llama-1.1B scale)

Bytes per element that must move: read p g m v (16), write p m v (12), write the bf16 copy (2):
30 B (the engine also zeroes the stage-2 gradient in the same pass, +4 B; left out here so no
variant ever runs on zeroed gradients). Prints one JSON line per variant (median ms, effective
GB/s), after the device-to-device copy bandwidth, the ceiling.
"""

from __future__ import annotations

import json
import sys

import torch
import triton.testing

from hf_zero.kernels import AdamHyperparams, adam_step_triton

BYTES_PER_ELEMENT = 30


def _report(name: str, n: int, ms: float, bytes_per_element: int) -> None:
    gbps = n * bytes_per_element / ms / 1e6
    print(json.dumps({"variant": name, "n": n, "ms": round(ms, 3), "GBps": round(gbps, 1)}), flush=True)


def _copy_ms(n: int) -> float:
    source = torch.empty(n, device="cuda").uniform_()
    target = torch.empty_like(source)
    return triton.testing.do_bench(lambda: target.copy_(source), return_mode="median")


def main() -> None:
    n = int(float(sys.argv[1])) if len(sys.argv) > 1 else 1_000_000_000
    _report("d2d copy (ceiling)", n, _copy_ms(n), 8)

    param = torch.randn(n, device="cuda")
    grad = torch.randn(n, device="cuda") * 1e-2
    exp_avg, exp_avg_sq = torch.zeros_like(param), torch.zeros_like(param)
    out = torch.empty(n, device="cuda", dtype=torch.bfloat16)
    scale = torch.tensor(0.5, device="cuda")
    hp = AdamHyperparams(lr=1e-4, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.01, step=10, decoupled=True)
    fused_ms = triton.testing.do_bench(
        lambda: adam_step_triton(param, grad, exp_avg, exp_avg_sq, out, hp, scale), return_mode="median"
    )
    _report("hf_zero fused kernel: scale + AdamW + bf16 copy", n, fused_ms, BYTES_PER_ELEMENT)

    master = torch.nn.Parameter(param)
    master.grad = grad
    optimizer = torch.optim.AdamW([master], lr=1e-4, betas=(0.9, 0.95), weight_decay=0.01, fused=True)

    def unfused() -> None:
        master.grad.mul_(scale)
        optimizer.step()
        out.copy_(master.detach())

    _report(
        "torch fused AdamW + scale pass + bf16 copy pass",
        n,
        triton.testing.do_bench(unfused, return_mode="median"),
        BYTES_PER_ELEMENT,
    )


if __name__ == "__main__":
    main()
