"""benchmarks/gpu_proof.sh's CPU dry run: every step of the GPU proof runs here on tiny configs and
the report section it writes holds each part (timings are not checked)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_cpu_dry_run_runs_every_step_and_reports_it(tmp_path):
    environment = dict(
        os.environ, PROOF_LOG_DIR=str(tmp_path / "logs"), PROOF_TEST_PATHS="tests/test_optim.py"
    )
    result = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_proof.sh"), "--cpu-dry-run"],
        capture_output=True, text=True, env=environment, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    report = (tmp_path / "logs" / "RESULTS.md").read_text()
    assert "## GPU proof, CPU dry run" in report and "Steps that failed: none." in report
    assert " passed" in report  # pytest's summary line
    assert "| sm_90a | 45 |" in report  # every kernel variant of the covering set compiled
    assert "without the skip flag" in report
    trainer_rows = [line for line in report.splitlines() if line.startswith("| tiny |")]
    # plain, stages 1-3, fp16, optimizer offload exact and delayed, parameters and optimizer offloaded
    assert len(trainer_rows) == 8
    assert report.count("- tiny stage ") == 2
    assert not (ROOT / "benchmarks" / "RESULTS.md.partial").exists()
