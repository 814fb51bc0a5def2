"""Hangs become errors: when ranks disagree about the next collective, every rank reports within
`ZeroConfig.collective_timeout` what it waits in and what each rank last issued, and exits
non-zero (`hf_zero.testing.hang_cases` on 2 gloo ranks, with a 3-second timeout)."""

from __future__ import annotations

import os
import re
import subprocess
import time

import pytest

from hf_zero.core.watchdog import HANG_EXIT_STATUS
from hf_zero.testing.launch import local_launch_command

TIMEOUT = 3.0


def _launch(case: str) -> tuple[subprocess.CompletedProcess, float]:
    env = dict(os.environ, OMP_NUM_THREADS="1", TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1")
    command = local_launch_command(2, ["-m", "hf_zero.testing.hang_cases", case, str(TIMEOUT)])
    start = time.monotonic()
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    return result, time.monotonic() - start


def _reports(stderr: str) -> dict[int, str]:
    """Each rank's hang report: its first line, then the lines naming every rank."""
    reports = {}
    for match in re.finditer(r"hf_zero: rank (\d) waited .*?(?=hf_zero: rank \d waited|\Z)", stderr, re.S):
        reports[int(match.group(1))] = match.group(0)
    return reports


@pytest.mark.parametrize(
    ("case", "waits"),
    [
        # rank 0 gathers a unit for generate while rank 1 gathers the weights for full_state_dict
        (
            "generate",
            {0: "#\\d+ on 'gather'.*, in generate", 1: "in full_state_dict"},
        ),
        # the same, rank 0 starting its wait later: rank 1 times out first and reports; rank 0,
        # waiting, reports the same hang at once
        (
            "late",
            {
                0: "until another rank timed out, in all_reduce #\\d+ on 'gather'.*, in generate",
                1: "in full_state_dict",
            },
        ),
        # rank 0 saves while rank 1 steps: both wait in their call's first collective
        ("save", {0: "in save_checkpoint", 1: "in (forward|backward|step)"}),
        # rank 0's host waits for its device in a step (NCCL's hang), rank 1 waits in a collective
        (
            "device",
            {
                0: r"in a wait for the device \(\w+\), in step, behind \w+ #\d+",
                1: "in (forward|backward|step)",
            },
        ),
    ],
)
def test_ranks_that_disagree_each_report_within_the_timeout(case, waits):
    result, seconds = _launch(case)
    assert result.returncode != 0
    assert "finished without a hang" not in result.stdout
    reports = _reports(result.stderr)
    assert set(reports) == {0, 1}, result.stderr[-4000:]
    for rank, pattern in waits.items():
        first_line = reports[rank].splitlines()[0]
        assert re.search(pattern, first_line), first_line
        # Every report names what both ranks last issued.
        assert "rank 0: waiting" in reports[rank] and "rank 1: waiting" in reports[rank], reports[rank]
    assert f"exitcode: {HANG_EXIT_STATUS}" in result.stderr
    assert seconds < 60  # launch, two steps, the timeout and the report: no hang


def test_a_rank_that_died_is_named_by_the_collective_it_broke():
    result, seconds = _launch("dead")
    assert result.returncode != 0
    assert "rank 0: finished without a hang" not in result.stdout
    # Gloo sees the closed connection at once; the error says which collective of which call broke.
    assert re.search(
        r"hf_zero: rank 0's \w+ #\d+ on 'main'.*, in (forward|backward|step) failed", result.stderr
    ), result.stderr[-4000:]
    assert seconds < 60
