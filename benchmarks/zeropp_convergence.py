"""ZeRO++ convergence: the GPT-2 recipe on 4 ranks as 2 nodes × 2, with each option alone and all
together, against the same run without them; prints a markdown table of the eval losses.

    python benchmarks/zeropp_convergence.py [--max-steps 200] [--stage 3] [--out runs/zeropp]

Every run uses the recipe's data, model and seed (`recipes/gpt2-clm-pretrain.yaml`), stage 3 and
`node_size=2`, so only the option differs. An option passes when its final eval loss is within 2 %
of the exact run's.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "gpt2-clm-pretrain.yaml"
OPTIONS = {
    "exact": [],
    "qwZ (int8 weights)": ["zero.quantized_weights=int8"],
    "hpZ (secondary partition of 2)": ["zero.hpz_partition_size=2"],
    "qgZ (int8 gradients)": ["zero.quantized_gradients=int8"],
    "qwZ + hpZ + qgZ": [
        "zero.quantized_weights=int8",
        "zero.hpz_partition_size=2",
        "zero.quantized_gradients=int8",
    ],
}
_EVAL = re.compile(r"step (\d+)/\d+ eval: loss ([0-9.]+)")


def run(name: str, overrides: list[str], args: argparse.Namespace) -> dict[int, float]:
    """Train the recipe with `overrides`; its eval loss by step."""
    out = Path(args.out) / re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    command = [
        sys.executable, "-m", "hf_zero.cli", "train", str(RECIPE), "--nproc", "4",
        f"training.output_dir={out}", f"training.max_steps={args.max_steps}",
        f"training.eval_steps={args.max_steps // 4}", "training.per_device_train_batch_size=4",
        f"zero.stage={args.stage}", "zero.node_size=2", *overrides,
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return {int(step): float(loss) for step, loss in _EVAL.findall(result.stdout)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-steps", type=int, default=200)
    parser.add_argument("--stage", type=int, default=3)
    parser.add_argument("--out", default="runs/zeropp")
    args = parser.parse_args()
    losses, seconds = {}, {}
    for name, overrides in OPTIONS.items():
        started = time.perf_counter()
        losses[name] = run(name, overrides, args)
        seconds[name] = time.perf_counter() - started
    steps = sorted(losses["exact"])
    print(f"| option | {' | '.join(f'eval loss @ {s}' for s in steps)} | final vs exact | run s |")
    print(f"|---|{'---|' * len(steps)}---|---|")
    exact = losses["exact"][steps[-1]]
    for name, by_step in losses.items():
        final = by_step[steps[-1]]
        cells = " | ".join(f"{by_step[s]:.4f}" for s in steps)
        print(f"| {name} | {cells} | {100 * (final - exact) / exact:+.2f} % | {seconds[name]:.0f} |")


if __name__ == "__main__":
    main()
