"""The benchmark script still runs (a CPU smoke run on a tiny model; timings are not checked)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "trainer_bench.py"


@pytest.mark.parametrize("options", [[], ["--precision", "fp16"]])
def test_trainer_bench_runs_on_cpu(options):
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "tiny", "zero2", "4", *options],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["mode"] == "zero2" and report["steps"] == 4 and report["step_ms"] > 0
    assert report["precision"] == ("fp16" if options else "fp32")
