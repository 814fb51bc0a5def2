"""Stage 2 with overlap when a parameter's gradient arrives more often than in the first backward
pass (here: two `loss.backward()` calls on one forward, with no boundary between them). Its bucket
was already reduced, so the engine must refuse loudly; with `overlap_comm=False` the same loop is
exact. Launch with torchrun (or after other checks in the same launch, see
`hf_zero.testing.sequence`); each rank writes `OUT_DIR/rank{r}.json`.

    torchrun --standalone --nproc_per_node 2 -m hf_zero.testing.late_gradient OUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import hf_zero

from .launch import exit_cleanly
from .tiny_models import build_model, make_samples


def _run(overlap: bool) -> dict:
    model = build_model("gpt2")
    engine = hf_zero.initialize(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        {"stage": 2, "reduce_bucket_size": 6000, "overlap_comm": overlap},
    )
    batch = make_samples("gpt2", 2, seed=dist.get_rank())
    engine.backward(engine(**batch).loss)  # the first pass: every hook fires once
    engine.step()
    loss = model(**batch).loss
    loss.backward(retain_graph=True)
    once = hf_zero.full_grad(model.transformer.h[0].mlp.c_fc.weight)
    engine.zero_grad()
    loss = model(**batch).loss
    loss.backward(retain_graph=True)
    try:
        loss.backward()  # every hook fires a second time in what the engine sees as one pass
    except RuntimeError as error:
        engine.zero_grad()  # finishes the pass on every rank, so the ranks stay in step
        return {"error": str(error)}
    twice = hf_zero.full_grad(model.transformer.h[0].mlp.c_fc.weight)
    return {
        "error": None,
        "ratio": (twice / once).nanmedian().item(),
        "max_diff": (twice - 2 * once).abs().max().item(),
    }


def run(out: Path) -> None:
    """Both loops, on every rank of the default process group; each rank writes `out/rank{r}.json`."""
    report = {"overlap": _run(overlap=True), "no_overlap": _run(overlap=False)}
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(report))


def main(argv: list[str]) -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    run(Path(argv[0]))
    exit_cleanly()


if __name__ == "__main__":
    main(sys.argv[1:])
