"""Turn the logs of one `benchmarks/gpu_proof.sh` run into a dated Markdown section and append it
to a results file (benchmarks/RESULTS.md on a GPU; the run's own folder in a dry run).

    python benchmarks/proof_report.py LOG_DIR RESULTS_MD [--title TEXT]

LOG_DIR holds what the proof script wrote: `env.txt`, `tests.txt` (pytest's summary), `compile.jsonl`
(hf_zero.testing.kernel_compile), `step_tail.jsonl` (adam_step_bench.py), `trainer.jsonl`
(trainer_bench.py, one line per run), `profile.jsonl` (step_profile.py) and `failures.jsonl`
(the steps that exited non-zero). A missing or failed
part is reported as such, never left out: the section says what ran.
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path


def _lines(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:  # the scripts' JSON lines, among other output (the Trainer prints a Python dict)
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _tail(path: Path, count: int) -> str:
    if not path.exists():
        return "(did not run)"
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    return "\n".join(lines[-count:]) or "(no output)"


def _trainer_table(rows: list[dict]) -> list[str]:
    if not rows:
        return ["(no trainer runs completed)"]
    out = [
        "| model | mode | options | step ms | × plain | peak GB | host GB | loss |",
        "|---|---|---|---|---|---|---|---|",
    ]
    plain = {row["model"]: row["step_ms"] for row in rows if row["mode"] == "plain"}
    for row in rows:
        config = row.get("zero_config") or {}
        options = [row["precision"]]
        if config.get("offload_optimizer"):
            options.append(f"offload {config['offload_optimizer']}")
        if config.get("offload_params"):
            options.append("offload params")
        if config.get("offload_overlap") == "delayed":
            options.append("delayed")
        ratio = f"{row['step_ms'] / plain[row['model']]:.2f}" if row["model"] in plain else "–"
        out.append(
            f"| {row['model']} | {row['mode']} | {', '.join(options)} | {row['step_ms']} | {ratio} "
            f"| {row['peak_GB']} | {row['host_peak_GB']} | {row['loss']} |"
        )
    return out


def _compile_table(rows: list[dict]) -> list[str]:
    if not rows:
        return ["(the compile check did not run)"]
    out = [
        "| target | variants | max registers | spilling | with narrow array accesses |",
        "|---|---|---|---|---|",
    ]
    for target in sorted({row["target"] for row in rows}):
        mine = [row for row in rows if row["target"] == target]
        narrow = [r for r in mine if r["unexpected_scalar_loads"] or r["unexpected_scalar_stores"]]
        out.append(
            f"| {target} | {len(mine)} | {max(r['registers'] for r in mine)} "
            f"| {sum(1 for r in mine if r['spill_bytes'])} | {len(narrow)} |"
        )
    return out


def _step_tail(rows: list[dict]) -> list[str]:
    if not rows:
        return ["(the step-tail benchmark did not run)"]
    floor = next((row for row in rows if "floor_ms" in row), None)
    out = []
    if floor:
        out.append(
            f"copy bandwidth {floor['copy_GBps']} GB/s, one-pass floor {floor['floor_ms']} ms for {floor['n']:.3g} elements"
        )
        out.append("")
    out += ["| variant | ms | × floor |", "|---|---|---|"]
    for row in rows:
        if "variant" in row:
            out.append(f"| {row['variant']} | {row['ms']} | {row['x_floor']} |")
    return out


def _profiles(rows: list[dict]) -> list[str]:
    if not rows:
        return ["(the step profile did not run)"]
    out = []
    for row in rows:
        phases = ", ".join(f"{name} {ms}" for name, ms in row["phases_ms"].items())
        out.append(
            f"- {row['model']} stage {row['stage']} {row['precision']}: {row['step_ms']} ms = {phases}"
        )
        for op in row["top_ops"][:6]:
            out.append(f"  - {op['op']}: {op['self_ms']} ms in {op['calls']} calls")
    return out


def section(log_dir: Path, title: str) -> str:
    """The Markdown section for the proof run logged in `log_dir`."""
    env = _tail(log_dir / "env.txt", 40)
    failures = _lines(log_dir / "failures.jsonl")
    failed = ", ".join(f"{row['failed']} (exit {row['exit']})" for row in failures) or "none"
    parts = [
        f"## {title}",
        "",
        f"Steps that failed: {failed}.",
        "",
        "Environment (`hf-zero env`):",
        "",
        "```",
        env,
        "```",
        "",
        "Single-rank tests on the device (`pytest --device ...`):",
        "",
        "```",
        _tail(log_dir / "tests.txt", 3),
        "```",
        "",
        "Kernels compiled ahead of time (`python -m hf_zero.testing.kernel_compile`):",
        "",
        *_compile_table(_lines(log_dir / "compile.jsonl")),
        "",
        "Optimizer step tail (`benchmarks/adam_step_bench.py`):",
        "",
        *_step_tail(_lines(log_dir / "step_tail.jsonl")),
        "",
        "Trainer table (`benchmarks/trainer_bench.py`, median settled step):",
        "",
        *_trainer_table(_lines(log_dir / "trainer.jsonl")),
        "",
        "One step by phase (`benchmarks/step_profile.py`, ms, each phase ended by a synchronisation):",
        "",
        *_profiles(_lines(log_dir / "profile.jsonl")),
        "",
    ]
    return "\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("log_dir", type=Path)
    parser.add_argument("results", type=Path)
    parser.add_argument("--title", default=None)
    options = parser.parse_args()
    title = options.title or f"GPU proof ({datetime.date.today().isoformat()})"
    text = section(options.log_dir, title)
    existing = options.results.read_text() if options.results.exists() else "# Benchmark results\n"
    # Written whole and renamed into place: an interrupted run leaves the old file intact.
    partial = options.results.with_suffix(".md.partial")
    partial.write_text(existing.rstrip("\n") + "\n\n" + text)
    partial.replace(options.results)
    print(text)


if __name__ == "__main__":
    main()
