"""Ranks that disagree, launched by `tests/test_hangs.py`: each case must end with every rank's
hang report (or, for a rank that died, the error naming the collective) instead of a hang.

    torchrun --nproc_per_node 2 -m hf_zero.testing.hang_cases CASE TIMEOUT

- `generate`: stage 3; rank 0 samples with `model.generate` (the usual `if rank == 0:` pattern),
  rank 1 goes on to `full_state_dict` (what saving does).
- `save`: stage 2; rank 0 saves a checkpoint, rank 1 takes another training step (its data had one
  more batch).
- `dead`: stage 2; rank 1's process ends in the middle of training.
"""

from __future__ import annotations

import os
import sys
import tempfile

import torch
import torch.distributed as dist

import hf_zero

from .tiny_models import build_model, make_samples


def _step(engine, samples, step: int) -> None:
    batch = {key: value[2 * step : 2 * step + 2] for key, value in samples.items()}
    engine.backward(engine(**batch).loss)
    engine.step()
    engine.zero_grad()


def main() -> None:
    case, timeout = sys.argv[1], float(sys.argv[2])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    stage = 3 if case == "generate" else 2
    model = build_model("llama")
    engine = hf_zero.initialize(
        model,
        torch.optim.AdamW(model.parameters(), lr=1e-3),
        {"stage": stage, "collective_timeout": timeout},
    )
    samples = make_samples("llama", 8)
    for step in range(2):
        _step(engine, samples, step)
    print(f"rank {rank}: trained", flush=True)
    if case == "generate":
        if rank == 0:
            model.generate(samples["input_ids"][:1, :4], max_new_tokens=3, do_sample=False)
        else:
            engine.full_state_dict()
    elif case == "save":
        if rank == 0:
            engine.save_checkpoint(os.path.join(tempfile.mkdtemp(), "checkpoint"))
        else:
            _step(engine, samples, 2)
    elif case == "dead":
        if rank == 1:
            os._exit(3)
        _step(engine, samples, 2)
    print(f"rank {rank}: finished without a hang", flush=True)


if __name__ == "__main__":
    main()
