"""Muon's optimizer step: torch's on the whole model against hf_zero's, sharded over the ranks.

    torchrun --nproc_per_node 2 benchmarks/muon_step_bench.py [--layers 6] [--width 512] [--steps 5]

Builds a GPT-2 config (no download) and trains it with Muon for the hidden matrices and AdamW for
the rest (`hf_zero.muon_with_adamw`), twice on every rank: unsharded, where the step is
`torch.optim.Muon` and `torch.optim.AdamW` over the whole model (what each rank of DDP runs), and
through `hf_zero.initialize` at `--stage`, where each rank keeps 1/N of the momentum and
orthogonalises the matrices it owns. Rank 0 prints the median time of the optimizer step alone
(after backward) and of a whole training step, each way, with the owners' Newton–Schulz spread.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, GPT2Config

import hf_zero


def _model(layers: int, width: int) -> torch.nn.Module:
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=layers,
        n_embd=width,
        n_head=8,
        vocab_size=4096,
        n_positions=256,
        bos_token_id=0,
        eos_token_id=0,
    )
    return AutoModelForCausalLM.from_config(config)


def _timed(step, backward, count: int) -> tuple[float, float]:
    """Median seconds of `step` alone and of `backward` + `step`."""
    steps, wholes = [], []
    for _ in range(count + 1):  # the first builds the optimizer state
        start = time.perf_counter()
        backward()
        middle = time.perf_counter()
        step()
        end = time.perf_counter()
        steps.append(end - middle)
        wholes.append(end - start)
    return statistics.median(steps[1:]), statistics.median(wholes[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=128, help="tokens per rank per step")
    parser.add_argument("--stage", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    ids = torch.randint(0, 4096, (1, args.tokens), generator=torch.Generator().manual_seed(dist.get_rank()))
    batch = {"input_ids": ids, "labels": ids}

    plain = _model(args.layers, args.width)
    chain = hf_zero.muon_with_adamw(plain, lr=0.02, adamw_lr=3e-4)

    def plain_step() -> None:
        chain.step()
        chain.zero_grad()

    unsharded = _timed(plain_step, lambda: plain(**batch).loss.backward(), args.steps)

    model = _model(args.layers, args.width)
    engine = hf_zero.initialize(
        model, hf_zero.muon_with_adamw(model, lr=0.02, adamw_lr=3e-4), {"stage": args.stage}
    )

    def engine_step() -> None:
        engine.step()
        engine.zero_grad()

    sharded = _timed(engine_step, lambda: engine.backward(engine(**batch).loss), args.steps)
    plan = engine.matrix_step
    if dist.get_rank() == 0:
        world = dist.get_world_size()
        matrices = sum(shape.numel() for shape in plan.shapes)
        print(
            f"GPT-2 {args.layers} layers x {args.width}: {sum(p.numel() for p in model.parameters()):,} parameters, "
            f"{len(plan.shapes)} Muon matrices ({matrices:,} elements); {world} ranks, {args.tokens} tokens each, "
            f"one thread per rank; Newton-Schulz spread {plan.spread():.3f}"
        )
        print(
            f"unsharded torch Muon + AdamW: step {unsharded[0] * 1e3:.1f} ms, whole {unsharded[1] * 1e3:.1f} ms"
        )
        print(
            f"hf_zero stage {args.stage}:              step {sharded[0] * 1e3:.1f} ms, whole {sharded[1] * 1e3:.1f} ms"
        )
        print(f"step ratio (hf_zero / unsharded): {sharded[0] / unsharded[0]:.2f}")
    engine.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
