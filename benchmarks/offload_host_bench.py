"""What optimizer offload costs on the host: the AdamW update over a flat fp32 shard, and the NVMe
swap file's reads and writes, on this machine's CPU and disk.

    python benchmarks/offload_host_bench.py [--elements N] [--nvme-path DIR] [--gigabytes G]

`update`: hf_zero's host step (`adam_step` on CPU tensors: torch's fused CPU AdamW, then the
16-bit copy) against the reference step built from separate PyTorch operations, which the host
ran before; in ms, elements/s and GB/s over the 28 bytes each element moves at the minimum (the
same floor as `adam_step_bench.py`). `swap` (with --nvme-path): `SwapFile` writing then reading G
GB through its thread pool and aligned buffers (O_DIRECT where the filesystem takes it), against
`dd` with `oflag=direct` / `iflag=direct` on the same folder. Prints one JSON line per measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time

import torch

from hf_zero.core.device import DeviceOps
from hf_zero.kernels.adamw import AdamHyperparams, adam_step, adam_step_reference
from hf_zero.offload.nvme import SwapFile

FLOOR_BYTES_PER_ELEMENT = 28


def _time(fn, repeats: int = 5) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def bench_update(n: int) -> None:
    hp = AdamHyperparams(
        lr=1e-4, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, step=10, decoupled=True
    )
    param, grad = torch.randn(n), torch.randn(n)
    exp_avg, exp_avg_sq, out = torch.zeros(n), torch.zeros(n), torch.empty(n, dtype=torch.bfloat16)
    scale = torch.tensor([0.5])
    for name, step in (
        ("hf_zero host step (torch fused CPU AdamW)", adam_step),
        ("reference ops", adam_step_reference),
    ):
        seconds = _time(lambda step=step: step(param, grad, exp_avg, exp_avg_sq, out, hp, scale))
        print(
            json.dumps(
                {
                    "measure": "update",
                    "variant": name,
                    "elements": n,
                    "threads": torch.get_num_threads(),
                    "ms": round(seconds * 1e3, 2),
                    "elements_per_s": round(n / seconds),
                    "GB/s_over_28B": round(n * FLOOR_BYTES_PER_ELEMENT / seconds / 1e9, 2),
                }
            )
        )


def _dd(args: list[str]) -> float:
    done = subprocess.run(["dd", *args], capture_output=True, text=True, check=True)
    # dd's last line ends with "... s, X GB/s"; recompute from bytes and seconds for a number.
    fields = done.stderr.strip().splitlines()[-1].split(",")
    copied = int(fields[0].split()[0])
    seconds = float(fields[-2].split()[0])
    return copied / seconds / 1e9


def bench_swap(folder: str, gigabytes: float) -> None:
    nbytes = int(gigabytes * 1e9) // (16 << 20) * (16 << 20)
    swap = SwapFile(folder, rank=0)
    offset = swap.reserve(nbytes)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    buffer = DeviceOps.for_device(device).host_empty(nbytes, torch.uint8)  # page-locked on a GPU
    buffer.random_(0, 255)
    # The first write fills blocks reserved but never written; training rewrites them every step.
    for what, move in (
        ("first write", swap.write_from),
        ("write", swap.write_from),
        ("read", swap.read_into),
    ):
        start = time.perf_counter()
        for future in move(buffer, offset):
            future.result()
        if what != "read":
            os.fsync(swap.fd)
        seconds = time.perf_counter() - start
        print(
            json.dumps(
                {"measure": "swap", "variant": f"SwapFile {what}", "direct": swap.direct,
                 "bytes": nbytes, "GB/s": round(nbytes / seconds / 1e9, 2)}
            )
        )  # fmt: skip
    with tempfile.NamedTemporaryFile(dir=folder) as target:
        count = str(nbytes // (16 << 20))
        for what, args in (
            ("write", ["if=/dev/zero", f"of={target.name}", "bs=16M", f"count={count}", "oflag=direct"]),
            ("read", [f"if={target.name}", "of=/dev/null", "bs=16M", f"count={count}", "iflag=direct"]),
        ):
            try:
                rate = _dd(args)
            except subprocess.CalledProcessError as error:
                print(
                    json.dumps(
                        {"measure": "swap", "variant": f"dd {what}", "error": error.stderr.strip()[-200:]}
                    )
                )
                continue
            print(
                json.dumps(
                    {
                        "measure": "swap",
                        "variant": f"dd {what} (direct)",
                        "bytes": nbytes,
                        "GB/s": round(rate, 2),
                    }
                )
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--elements", type=int, default=50_000_000)
    parser.add_argument("--nvme-path", default=None)
    parser.add_argument("--gigabytes", type=float, default=2.0)
    args = parser.parse_args()
    bench_update(args.elements)
    if args.nvme_path:
        bench_swap(args.nvme_path, args.gigabytes)


if __name__ == "__main__":
    main()
