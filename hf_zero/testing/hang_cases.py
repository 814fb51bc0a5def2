"""Ranks that disagree, launched by `tests/test_hangs.py`: each case must end with every rank's
hang report (or, for a rank that died, the error naming the collective) instead of a hang.

    torchrun --nproc_per_node 2 -m hf_zero.testing.hang_cases CASE TIMEOUT

- `generate`: stage 3; rank 0 samples with `model.generate` (the usual `if rank == 0:` pattern),
  rank 1 goes on to `full_state_dict` (what saving does).
- `late`: the same, rank 0 starting its wait two thirds of the timeout later: rank 1 times out and
  reports first; rank 0, waiting, reports the hang too.
- `save`: stage 2; rank 0 saves a checkpoint, rank 1 takes another training step (its data had one
  more batch).
- `device`: stage 2 in fp16; rank 0's device never finishes what the host waits for in a step (as on
  NCCL, where a collective no peer joins blocks the host only at its next wait for the device),
  rank 1 trains on.
- `dead`: stage 2; rank 1's connections close in the middle of training (then its process ends).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

import torch
import torch.distributed as dist

import hf_zero

from .tiny_models import build_model, make_samples


def _step(engine, samples, step: int) -> None:
    batch = {key: value[2 * step : 2 * step + 2] for key, value in samples.items()}
    engine.backward(engine(**batch).loss)
    engine.step()
    engine.zero_grad()


def _device_never_finishes(engine) -> None:
    """From now on every host wait for the device that the engine marks (a value read or copied
    to the host) blocks, as a device stuck in a collective would block it."""
    read, copy = torch.Tensor.item, torch.Tensor.to

    def stuck(real):
        def wait(tensor, *args, **kwargs):
            waiting = engine.watch.waiting
            if waiting is not None and waiting.get("device"):
                time.sleep(3600)
            return real(tensor, *args, **kwargs)

        return wait

    torch.Tensor.item, torch.Tensor.to = stuck(read), stuck(copy)


def main() -> None:
    case, timeout = sys.argv[1], float(sys.argv[2])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    stage = 3 if case in ("generate", "late") else 2
    model = build_model("llama")
    engine = hf_zero.initialize(
        model,
        torch.optim.AdamW(model.parameters(), lr=1e-3),
        # fp16 makes the step read its overflow flag on the host: a wait for the device.
        {"stage": stage, "collective_timeout": timeout, "precision": "fp16" if case == "device" else "fp32"},
    )
    samples = make_samples("llama", 8)
    for step in range(2):
        _step(engine, samples, step)
    print(f"rank {rank}: trained", flush=True)
    if case in ("generate", "late"):
        if rank == 0:
            if case == "late":  # rank 1 times out and reports while rank 0 still waits
                time.sleep(2 * timeout / 3)
            model.generate(samples["input_ids"][:1, :4], max_new_tokens=3, do_sample=False)
        else:
            engine.full_state_dict()
    elif case == "save":
        if rank == 0:
            engine.save_checkpoint(os.path.join(tempfile.mkdtemp(), "checkpoint"))
        else:
            _step(engine, samples, 2)
    elif case == "device":
        if rank == 0:
            _device_never_finishes(engine)
        for step in (2, 3):
            _step(engine, samples, step)
    elif case == "dead":
        if rank == 1:
            # Its connections close, as a crashed process's do, but the process stays a while: the
            # launcher stops every rank once one exits, and under load it cut off rank 0's report.
            dist.destroy_process_group()
            time.sleep(30)
            os._exit(3)
        _step(engine, samples, 2)
    print(f"rank {rank}: finished without a hang", flush=True)


if __name__ == "__main__":
    main()
