"""Smoke tests: each benchmark script still runs to the end on a tiny model on the CPU; its timings
and numbers are not checked (`benchmarks/gpu_proof.sh` measures them on a GPU)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _run(script: str, *args: str) -> list[str]:
    """Run a benchmark script to completion; its output lines."""
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return result.stdout.strip().splitlines()


def test_smoke_trainer_bench_runs_on_cpu():
    # One smoke run through the most options at once: stage 3, fp16, CPU offload of the optimizer
    # and the parameters, the delayed update.
    options = ["--precision", "fp16", "--offload", "cpu", "--offload-params", "--delayed"]
    report = json.loads(_run("trainer_bench.py", "tiny", "zero3", "4", *options)[-1])
    assert report["mode"] == "zero3" and report["steps"] == 4 and report["step_ms"] > 0
    assert report["precision"] == "fp16" and report["host_peak_GB"] > 0
    assert report["zero_config"] == {
        "stage": 3, "offload_optimizer": "cpu", "offload_params": "cpu", "offload_overlap": "delayed"
    }  # fmt: skip


def test_smoke_offload_host_bench_runs_on_cpu(tmp_path):
    output = _run(
        "offload_host_bench.py", "--elements", "100000", "--nvme-path", str(tmp_path), "--gigabytes", "0.05"
    )
    lines = [json.loads(line) for line in output]
    updates = [line for line in lines if line["measure"] == "update"]
    swaps = {line["variant"]: line for line in lines if line["measure"] == "swap"}
    assert len(updates) == 2 and all(line["elements_per_s"] > 0 for line in updates)
    assert swaps["SwapFile write"]["GB/s"] > 0 and swaps["SwapFile read"]["GB/s"] > 0


def test_smoke_anchor_bench_runs_the_plain_trainer_on_cpu():
    # Only the plain mode: the anchor script's other modes (DeepSpeed, FSDP2) need a GPU.
    report = json.loads(_run("anchor_bench.py", "tiny", "plain", "5")[-1])
    assert report["mode"] == "plain" and report["steps"] == 5 and report["step_ms"] > 0
    assert report["device"] == "cpu" and 0 < report["loss"] < 10
