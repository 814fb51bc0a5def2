"""Every Triton kernel variant compiles for real GPUs (sm_80 and sm_90a) on this GPU-less machine,
spills nothing, and moves its arrays with 128-bit vector loads and stores
(hf_zero/testing/kernel_compile.py). Compiled in a subprocess: the other kernel tests run under
Triton's interpreter (conftest.py), whose kernels cannot be compiled."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from hf_zero.testing.kernel_compile import count_accesses

pytest.importorskip("triton.backends.nvidia.compiler", reason="needs Triton's NVIDIA backend (Linux)")


@pytest.fixture(scope="module")
def reports() -> list[dict]:
    environment = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    environment["TRITON_DEFAULT_FP_FUSION"] = "1"  # the JIT's default; silences Triton 3.9's notice
    result = subprocess.run(
        [sys.executable, "-m", "hf_zero.testing.kernel_compile", "--arch", "80", "90"],
        capture_output=True, text=True, env=environment, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_every_variant_compiles_for_both_targets(reports):
    targets = {report["target"] for report in reports}
    assert targets == {"sm_80", "sm_90a"}
    kernels = {report["variant"].split("[")[0] for report in reports}
    assert kernels == {"adam", "sgd", "grad_stats", "quantize", "dequantize"}
    assert len(reports) == 2 * (39 + 6)


def test_no_variant_spills(reports):
    spilling = [(r["variant"], r["target"], r["spill_bytes"]) for r in reports if r["spill_bytes"]]
    assert not spilling


def test_arrays_move_in_128_bit_accesses_in_every_variant(reports):
    # Apart from the per-launch scalars (unscale factor, skip flag), a reduction's per-program
    # partial sums and the quantization scales, every global access is a 128-bit vector one: the
    # fp16 skip path included.
    scalar = [
        (r["variant"], r["target"], r["unexpected_scalar_loads"], r["unexpected_scalar_stores"])
        for r in reports
        if r["unexpected_scalar_loads"] or r["unexpected_scalar_stores"]
    ]
    assert not scalar
    assert all(r["vector_loads"] > 0 for r in reports)
    optimizers = [r for r in reports if not r["variant"].startswith("grad_stats")]  # and quantization
    assert all(r["vector_stores"] > 0 for r in optimizers)


def test_access_counter_tells_vector_from_scalar():
    ptx = """
        @%p1 ld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];
        ld.global.b32 { %r5 }, [ %rd2 + 0 ];
        @%p2 ld.global.L1::evict_last.b16 { %rs1 }, [ %rd3 + 0 ];
        @%p2 ld.global.v2.b32 { %r6, %r7 }, [ %rd4 + 0 ];
        @%p3 st.global.v4.b32 [ %rd5 + 0 ], { %r1, %r2, %r3, %r4 };
        @%p3 st.global.b16 [ %rd6 + 0 ], { %rs1 };
    """
    assert count_accesses(ptx) == {
        "vector_loads": 1,
        "scalar_loads": 3,
        "vector_stores": 1,
        "scalar_stores": 1,
    }
