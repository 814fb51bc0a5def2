"""Stage-3 checks beyond training, on every rank; launch with torchrun. Rank 0 writes
`OUT_DIR/report.json`.

    torchrun --standalone --nproc_per_node 2 -m hf_zero.testing.stage3_checks OUT_DIR

- greedy `generate` of a stage-3 model, gathering unit by unit and inside one
  `gathered_parameters` block (which gathers once for the whole call);
- `gathered_parameters(..., modifier_rank=1)`: rank 1's edit reaches every rank's weights, shards
  and masters, the other ranks' edits are dropped;
- `full_state_dict` of a stage-3 model equals the model it was built from.
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

PROMPT_TOKENS = 6
NEW_TOKENS = 5


def prompt() -> torch.Tensor:
    return make_samples("llama", 2, seed=3)["input_ids"][:, :PROMPT_TOKENS]


def main(argv: list[str]) -> None:
    out = Path(argv[0])
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    model = build_model("llama").eval()
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    engine = hf_zero.initialize(model, torch.optim.SGD(model.parameters(), lr=0.1), {"stage": 3})
    report = {
        "full_state_dict_exact": all(
            torch.equal(engine.full_state_dict()[k], v) for k, v in reference.items()
        )
    }

    before = engine.gather_comm.bytes_sent
    unit_by_unit = model.generate(prompt(), max_new_tokens=NEW_TOKENS, do_sample=False)
    per_unit_bytes = engine.gather_comm.bytes_sent - before
    before = engine.gather_comm.bytes_sent
    with hf_zero.gathered_parameters(model.parameters()):
        gathered_once = model.generate(prompt(), max_new_tokens=NEW_TOKENS, do_sample=False)
    report["generate_unit_by_unit"] = unit_by_unit.tolist()
    report["generate_gathered_once"] = gathered_once.tolist()
    report["gather_bytes"] = {"unit_by_unit": per_unit_bytes, "once": engine.gather_comm.bytes_sent - before}

    weight = model.model.layers[1].mlp.down_proj.weight
    with hf_zero.gathered_parameters([weight], modifier_rank=1), torch.no_grad():
        weight.fill_(0.25 if dist.get_rank() == 1 else -1.0)
    full = engine.full_state_dict()["model.layers.1.mlp.down_proj.weight"]
    with hf_zero.gathered_parameters([weight]):
        live = weight.detach().clone()
    everywhere = torch.tensor([float(bool((full == 0.25).all() and (live == 0.25).all()))])
    dist.all_reduce(everywhere, op=dist.ReduceOp.MIN)
    report["modifier_rank_written_everywhere"] = bool(everywhere.item())
    if dist.get_rank() == 0:
        (out / "report.json").write_text(json.dumps(report))
    exit_cleanly()


if __name__ == "__main__":
    main(sys.argv[1:])
