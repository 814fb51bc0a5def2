"""Stage-3 checks beyond training, on every rank; launch with torchrun (or after other checks in
the same launch, see `hf_zero.testing.sequence`). Rank 0 writes `OUT_DIR/report.json`.

    torchrun --standalone --nproc_per_node 2 -m hf_zero.testing.stage3_checks OUT_DIR

- greedy `generate` of a stage-3 model, gathering unit by unit for every token (where ranks
  generating different numbers of tokens must not hang), gathering the whole model once per call
  (what "auto" does for a model that fits), and inside one `gathered_parameters` block;
- `gathered_parameters(..., modifier_rank=1)`: rank 1's edit reaches every rank's weights, shards
  and masters, the other ranks' edits are dropped;
- `full_state_dict` of a stage-3 model equals the model it was built from;
- the full weights written unit by unit into a `save_pretrained` folder: first one file, then
  sharded (with an index) into the same folder, with the host bytes rank 0 held at most.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from transformers.utils.hub import convert_file_size_to_int

import hf_zero
from hf_zero.hub.saving import save_full_weights

from .launch import exit_cleanly
from .tiny_models import build_model, make_samples

PROMPT_TOKENS = 6
NEW_TOKENS = 5
SHARD_SIZE = "100KB"


def prompt() -> torch.Tensor:
    return make_samples("llama", 2, seed=3)["input_ids"][:, :PROMPT_TOKENS]


def run(out: Path) -> None:
    """The checks, on every rank of the default process group; rank 0 writes `out/report.json`
    and the folders the test loads."""
    model = build_model("llama").eval()
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    engine = hf_zero.initialize(model, torch.optim.SGD(model.parameters(), lr=0.1), {"stage": 3})
    report = {
        "full_state_dict_exact": all(
            torch.equal(engine.full_state_dict()[k], v) for k, v in reference.items()
        )
    }

    def generate(tokens: int) -> tuple[list, int]:
        before = engine.gather_comm.bytes_sent
        output = model.generate(prompt(), max_new_tokens=tokens, do_sample=False)
        return output.tolist(), engine.gather_comm.bytes_sent - before

    rank = dist.get_rank()
    outputs, gather_bytes = {}, {}
    for mode in ("per_unit", "auto"):
        engine.config.generate_gather = mode
        for tokens in (NEW_TOKENS, 2 * NEW_TOKENS):
            outputs[f"{mode}-{tokens}"], gather_bytes[f"{mode}-{tokens}"] = generate(tokens)
        # Ranks asking for different lengths: the shorter ones keep stepping with the others.
        outputs[f"{mode}-rank{rank}"], _ = generate(NEW_TOKENS - rank)
    with hf_zero.gathered_parameters(model.parameters()):
        outputs["block"], gather_bytes["block"] = generate(NEW_TOKENS)
    engine.config.generate_gather = "auto"
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, outputs)
    report["generate"] = gathered
    report["gather_bytes"] = gather_bytes
    report["model_bytes"] = sum(engine.gatherer.unit_bytes)

    weight = model.model.layers[1].mlp.down_proj.weight
    with hf_zero.gathered_parameters([weight], modifier_rank=1), torch.no_grad():
        weight.fill_(0.25 if dist.get_rank() == 1 else -1.0)
    full = engine.full_state_dict()["model.layers.1.mlp.down_proj.weight"]
    with hf_zero.gathered_parameters([weight]):
        live = weight.detach().clone()
    everywhere = torch.tensor([float(bool((full == 0.25).all() and (live == 0.25).all()))])
    dist.all_reduce(everywhere, op=dist.ReduceOp.MIN)
    report["modifier_rank_written_everywhere"] = bool(everywhere.item())

    keep = dist.get_rank() == 0
    full = engine.full_state_dict(keep=keep)
    save_full_weights(engine, out / "saved", keep)
    report["saved_single"] = sorted(p.name for p in (out / "saved").iterdir()) if keep else []
    report["saved"] = save_full_weights(engine, out / "saved", keep, max_shard_size=SHARD_SIZE)
    report["shard_bytes"] = convert_file_size_to_int(SHARD_SIZE)
    report["unit_fp32_bytes"] = [4 * sum(p.numel() for p in unit.params) for unit in engine.units]
    model.save_pretrained(out / "save_pretrained")  # every rank, as a plain loop would call it
    if keep:
        model.config.save_pretrained(out / "saved")
        save_file({k: v.clone() for k, v in full.items()}, str(out / "expected.safetensors"))
    if dist.get_rank() == 0:
        (out / "report.json").write_text(json.dumps(report))


def main(argv: list[str]) -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    run(Path(argv[0]))
    exit_cleanly()


if __name__ == "__main__":
    main(sys.argv[1:])
