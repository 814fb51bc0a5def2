"""`hf_zero.from_pretrained` at stage 3 on every rank; launch with torchrun. Rank 0 writes
`OUT_DIR/report.json`.

    torchrun --standalone --nproc_per_node 2 -m hf_zero.testing.loading_checks OUT_DIR

Rank 0 first saves tiny models with `save_pretrained` under OUT_DIR: Llama as one file and as an
index with shards (a small `max_shard_size`), GPT-2 (tied embeddings) and BERT masked-LM. Every
rank then loads them with `from_pretrained(..., ZeroConfig(stage=3))` and shards them with an
AdamW of two param groups and small buckets (chunk boundaries cut parameters), and reports:

- "values": per folder, whether `engine.full_state_dict()` equals the file's tensors exactly
  (tied names included), whether the buffers equal those of the model transformers loads, whether
  GPT-2's head is still its embedding, the bytes this rank read, the folder's weight bytes and
  this rank's shard size in the files' bytes (padding included);
- "training": per model, whether 3 AdamW steps from it give bit-identical weights to the same
  steps from the model transformers loads (`from_pretrained`, then `initialize` at stage 3);
- "missing": BERT for sequence classification from the masked-LM folder, every rank seeded
  differently: the new head's values (they must be rank 0's everywhere, and equal to what
  transformers initialises with rank 0's seed);
- "bf16": Llama loaded with `dtype=torch.bfloat16` against transformers' bf16 load;
- "accelerate": the sharded Llama folder through `ZeroAccelerator.prepare`, weights exact.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, BertForMaskedLM, BertForSequenceClassification

import hf_zero
from hf_zero.hub.weights import load_pretrained_weights

from .cases import BUCKET_SIZE, build_optimizer
from .launch import exit_cleanly
from .tiny_models import build_model, make_samples, slice_samples

STAGE3 = {"stage": 3, "reduce_bucket_size": BUCKET_SIZE}
FOLDERS = {  # folder -> (tiny model, class that loads it, max_shard_size or None for one file)
    "llama": ("llama", AutoModelForCausalLM, None),
    "llama-sharded": ("llama", AutoModelForCausalLM, "60KB"),
    "gpt2": ("gpt2", AutoModelForCausalLM, None),
    "bert-sharded": ("bert", BertForMaskedLM, "100KB"),
}
STEPS = 3
MICRO_BATCH = 2
SEED_BASE = 100  # rank r seeds SEED_BASE + r before loading a model with keys the folder lacks


def save_folders(root: Path) -> None:
    for folder, (name, _, shard_size) in FOLDERS.items():
        kwargs = {"max_shard_size": shard_size} if shard_size else {}
        build_model(name).save_pretrained(root / folder, **kwargs)


def _sharded(model: torch.nn.Module, config: dict = STAGE3) -> hf_zero.ZeroEngine:
    return hf_zero.initialize(model, build_optimizer("adamw", list(model.named_parameters()), model), config)


def check_values(folder: Path, model_class) -> dict:
    model = hf_zero.from_pretrained(model_class, folder, STAGE3)
    reference = model_class.from_pretrained(folder)
    engine = _sharded(model)
    full = engine.full_state_dict()
    files = load_pretrained_weights(folder)
    itemsize = next(iter(files.values())).element_size()
    expected = reference.state_dict()  # the file's values under every name, tied ones included
    buffers = dict(model.named_buffers())
    result = {
        "exact": full.keys() == expected.keys() and all(torch.equal(full[k], v) for k, v in expected.items()),
        "file_matches_reference": all(torch.equal(v, expected[k]) for k, v in files.items()),
        "buffers_equal": all(torch.equal(buffers[k], v) for k, v in reference.named_buffers()),
        "loaded_bytes": engine.loaded_bytes,
        "weight_bytes": sum(t.numel() * t.element_size() for t in files.values()),
        "shard_bytes": sum(g.layout.shard_numel for g in engine.groups + engine.frozen) * itemsize,
    }
    if hasattr(model, "lm_head") and hasattr(model, "transformer"):
        result["tied"] = model.lm_head.weight is model.transformer.wte.weight
    return result


def _train(engine: hf_zero.ZeroEngine, name: str) -> dict[str, torch.Tensor]:
    rank, world = dist.get_rank(), dist.get_world_size()
    samples = make_samples(name, STEPS * world * MICRO_BATCH)
    for step in range(STEPS):
        batch = slice_samples(samples, (step * world + rank) * MICRO_BATCH, MICRO_BATCH)
        engine.backward(engine(**batch).loss)
        engine.step()
    return engine.full_state_dict()


def check_training(folder: Path, name: str) -> dict:
    ours = _train(_sharded(hf_zero.from_pretrained(AutoModelForCausalLM, folder, STAGE3)), name)
    theirs = _train(_sharded(AutoModelForCausalLM.from_pretrained(folder)), name)
    start = load_pretrained_weights(folder)
    return {
        "identical": ours.keys() == theirs.keys() and all(torch.equal(ours[k], v) for k, v in theirs.items()),
        "moved": any(not torch.equal(ours[k], v) for k, v in start.items()),
    }


def check_missing_keys(folder: Path) -> dict:
    torch.manual_seed(SEED_BASE + dist.get_rank())
    model = hf_zero.from_pretrained(BertForSequenceClassification, folder, STAGE3)
    new = ["classifier.weight", "classifier.bias", "bert.pooler.dense.weight"]
    before = {name: model.get_parameter(name).detach().clone() for name in new}
    full = _sharded(model).full_state_dict()
    rank0 = {name: value.clone() for name, value in before.items()}
    for value in rank0.values():
        dist.broadcast(value, src=0)
    torch.manual_seed(SEED_BASE)
    transformers_init = BertForSequenceClassification.from_pretrained(folder).state_dict()
    return {
        "rank0_values_everywhere": all(torch.equal(full[name], rank0[name]) for name in new),
        "as_transformers_initialises": all(torch.equal(full[name], transformers_init[name]) for name in new),
        "differed_before_sharding": dist.get_rank() == 0 or not torch.equal(before[new[0]], rank0[new[0]]),
        "classifier_bias_max": full["classifier.bias"].abs().max().item(),
        "classifier_weight_std": full["classifier.weight"].std().item(),
        "pooler_weight_std": full["bert.pooler.dense.weight"].std().item(),
    }


def check_bf16(folder: Path) -> dict:
    model = hf_zero.from_pretrained(AutoModelForCausalLM, folder, STAGE3, dtype=torch.bfloat16)
    dtypes = {str(p.dtype) for p in model.parameters()}
    full = _sharded(model).full_state_dict()
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).state_dict()
    return {
        "loaded_dtypes": sorted(dtypes),
        "saved_dtypes": sorted({str(v.dtype) for v in full.values() if v.is_floating_point()}),
        "exact": all(torch.equal(full[k], v) for k, v in reference.items()),
    }


def check_accelerate(folder: Path) -> dict:
    accelerator = hf_zero.ZeroAccelerator(zero_config=STAGE3, cpu=True)
    model = hf_zero.from_pretrained(AutoModelForCausalLM, folder, STAGE3)
    optimizer = build_optimizer("adamw", list(model.named_parameters()), model)
    model, optimizer = accelerator.prepare(model, optimizer)
    state = accelerator.get_state_dict(model)
    files = load_pretrained_weights(folder)
    return {"exact": not state or all(torch.equal(state[k], v) for k, v in files.items())}


def main(argv: list[str]) -> None:
    out = Path(argv[0])
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    if dist.get_rank() == 0:
        save_folders(out)
    dist.barrier()
    report = {
        "values": {folder: check_values(out / folder, spec[1]) for folder, spec in FOLDERS.items()},
        "training": {name: check_training(out / name, name) for name in ("llama", "gpt2")},
        "missing": check_missing_keys(out / "bert-sharded"),
        "bf16": check_bf16(out / "llama"),
        "accelerate": check_accelerate(out / "llama-sharded"),
    }
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, report)
    if dist.get_rank() == 0:
        (out / "report.json").write_text(json.dumps(everyone))
    exit_cleanly()


if __name__ == "__main__":
    main(sys.argv[1:])
