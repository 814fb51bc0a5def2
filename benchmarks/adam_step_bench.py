"""The optimizer step's tail over one flat fp32 shard: hf_zero's kernels against torch's fused AdamW
with GradScaler-style unscaling and `clip_grad_norm_`.

    python benchmarks/adam_step_bench.py [N] [--dtype fp16|bf16] [--device cuda|cpu]   # N elements, default 1e9

The tail is: unscale the gradient, check it for inf/NaN, measure its norm, clip, AdamW, write the
16-bit copy. hf_zero does it in two reads of the 16-bit gradient shard: `grad_stats` (sum of
squares and non-finite count in one read) and the fused AdamW kernel with the unscale, clip
coefficient and skip flag folded in. The same tail without the skip flag (what bf16 runs, which
never skip a step) shows what reading the flag costs. The one-pass floor moves 28 bytes per element (read the
master, both moments and the 16-bit gradient: 14; write the master, both moments and the 16-bit
copy: 14) at the measured device-to-device copy bandwidth. Torch's path needs fp32 gradients for
its fused AdamW (fp32 master parameters), so it starts from an fp32 gradient: unscale and check
(`_amp_foreach_non_finite_check_and_unscale_`), `clip_grad_norm_` (a norm read and a scaling
pass), fused AdamW, and a copy pass to 16 bits.

Prints one JSON line per variant (median ms, effective GB/s over the floor's 28 bytes, × floor).
`--device cpu` runs the same code on the CPU (the kernels need TRITON_INTERPRET=1 there), timed
with the wall clock: a smoke run of the script, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
import triton.testing

from hf_zero.kernels.adamw import AdamHyperparams, adam_step_triton
from hf_zero.kernels.grad_stats import grad_stats_triton

FLOOR_BYTES_PER_ELEMENT = 28


def _bench(fn: Callable[[], object], device: str) -> float:
    """Median ms of `fn`: Triton's CUDA-event timer on the GPU, the wall clock elsewhere."""
    if device == "cuda":
        return triton.testing.do_bench(fn, return_mode="median")
    fn()  # warm-up (the interpreter's first call parses the kernel)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _report(name: str, n: int, ms: float, floor_ms: float) -> None:
    gbps = n * FLOOR_BYTES_PER_ELEMENT / ms / 1e6
    line = {
        "variant": name,
        "n": n,
        "ms": round(ms, 3),
        "GBps": round(gbps, 1),
        "x_floor": round(ms / floor_ms, 3),
    }
    print(json.dumps(line), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("n", nargs="?", type=float, default=1e9)
    parser.add_argument("--dtype", choices=["fp16", "bf16"], default="fp16")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    options = parser.parse_args()
    n, half = int(options.n), {"fp16": torch.float16, "bf16": torch.bfloat16}[options.dtype]
    device = options.device

    def bench(fn: Callable[[], object]) -> float:
        return _bench(fn, device)

    source = torch.empty(n, device=device).uniform_()
    target = torch.empty_like(source)
    copy_ms = bench(lambda: target.copy_(source))
    bandwidth = 8 * n / copy_ms / 1e6  # GB/s: read 4 + write 4 bytes per element
    floor_ms = FLOOR_BYTES_PER_ELEMENT * n / bandwidth / 1e6
    print(json.dumps({"copy_GBps": round(bandwidth, 1), "floor_ms": round(floor_ms, 3), "n": n}), flush=True)

    loss_scale, max_norm = 65536.0, 1.0
    param = torch.randn(n, device=device)
    grad16 = (torch.randn(n, device=device) * 1e-2 * loss_scale).to(half)
    exp_avg, exp_avg_sq = torch.zeros_like(param), torch.zeros_like(param)
    out = torch.empty(n, device=device, dtype=half)
    hp = AdamHyperparams(lr=1e-4, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.01, step=10, decoupled=True)
    unscale = 1.0 / loss_scale

    def hf_zero_tail(skip_flag: bool) -> None:
        stats = grad_stats_triton([grad16])
        norm = stats[0].sqrt() * unscale
        factor = torch.clamp(max_norm / (norm + 1e-6), max=1.0) * unscale
        adam_step_triton(
            param, grad16, exp_avg, exp_avg_sq, out, hp, factor, False, stats[1:] if skip_flag else None
        )

    _report(f"hf_zero: grad_stats + fused AdamW ({options.dtype} grad, unscale+inf+clip folded)", n,
            bench(lambda: hf_zero_tail(True)), floor_ms)  # fmt: skip
    _report(f"hf_zero: grad_stats + fused AdamW without the skip flag ({options.dtype} grad, unscale+clip folded)",
            n, bench(lambda: hf_zero_tail(False)), floor_ms)  # fmt: skip
    _report("hf_zero: fused AdamW alone (no stats pass)", n,
            bench(lambda: adam_step_triton(param, grad16, exp_avg, exp_avg_sq, out, hp)), floor_ms)  # fmt: skip

    master = torch.nn.Parameter(param)
    master.grad = torch.randn(n, device=device) * 1e-2 * loss_scale
    optimizer = torch.optim.AdamW([master], lr=1e-4, betas=(0.9, 0.95), weight_decay=0.01, fused=True)
    found_inf = torch.zeros(1, device=device)
    inv_scale = torch.full((1,), unscale, device=device)

    def torch_tail() -> None:
        torch._amp_foreach_non_finite_check_and_unscale_([master.grad], found_inf, inv_scale)
        torch.nn.utils.clip_grad_norm_([master], max_norm, foreach=True)
        optimizer.step()
        out.copy_(master.detach())
        master.grad.mul_(loss_scale)  # back to the scaled gradient, so every timed call sees the same input

    torch_ms = bench(torch_tail)
    rescale_ms = bench(lambda: master.grad.mul_(1.0))
    _report("torch: unscale + clip_grad_norm_ + fused AdamW + 16-bit copy (fp32 grad)", n, torch_ms - rescale_ms,
            floor_ms)  # fmt: skip


if __name__ == "__main__":
    main()
