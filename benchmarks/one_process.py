"""Run one benchmark script several times in one Python process, each with its own arguments:

    python benchmarks/one_process.py SCRIPT.py ARGS... [--then ARGS...]...

The CPU dry run of `gpu_proof.sh` uses it so that torch and transformers are imported once for
all its trainer runs instead of once per run (seconds each on a small CPU); on a GPU every run
keeps a process of its own, so that no run's memory or caches reach the next one's numbers. A
run that fails stops the rest with its exit status.
"""

from __future__ import annotations

import runpy
import sys


def split_runs(argv: list[str]) -> list[list[str]]:
    """The argument lists of the runs, separated by `--then`."""
    runs: list[list[str]] = [[]]
    for arg in argv:
        if arg == "--then":
            runs.append([])
        else:
            runs[-1].append(arg)
    return runs


def main() -> int:
    if len(sys.argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    script = sys.argv[1]
    for args in split_runs(sys.argv[2:]):
        sys.argv = [script, *args]
        try:
            runpy.run_path(script, run_name="__main__")
        except SystemExit as end:
            if end.code not in (None, 0):
                print(f"one_process: {script} {' '.join(args)} exited with {end.code}", file=sys.stderr)
                return end.code if isinstance(end.code, int) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
