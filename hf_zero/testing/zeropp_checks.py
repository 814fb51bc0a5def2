"""Launched by the ZeRO++ tests on 4 ranks as 2 nodes × 2 (`node_size=2`): bytes per step by
communicator, the weights against exact training, and the rules of order, with each option.

    torchrun --nproc_per_node 4 -m hf_zero.testing.zeropp_checks OUT.json

Each case trains a tiny GPT-2 of 4 layers (`zeropp_model`), prefetching as by default, in bf16 for `STEPS` steps of 2 micro-batches, every
rank on its own samples, recording every collective (`ZeroEngine.trace_collectives`) and the
bytes each communicator sent in the last step (and, from `CollectiveSpy`, the bytes of the tensors
the step really handed to `torch.distributed`). The exact case (no option) is the reference; every
rank's final fp32 weights are gathered and compared with it. Rank 0 writes, per case: the bytes by
communicator and operation (forward and backward gathers told apart by the trace's position before
or after the first reduction), the layout sizes the byte formulas need, the largest weight
difference to the exact run, the losses, whether all ranks' traces agree, and the memory breakdown.
Two cases save a checkpoint halfway, which `RESUMED` loads with the options on and off (under
"resumed": the losses after loading and the largest difference of the loaded weights to the saved).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import GPT2LMHeadModel

import hf_zero
from hf_zero.engine.rules_of_order import first_difference
from hf_zero.kernels import dequantize_int8_reference, quantize_int8_reference

from .engine_matrix import SPY
from .launch import exit_cleanly
from .tiny_models import build_model, make_samples, slice_samples

STEPS = 10
MICRO_BATCH = 2
NODE_SIZE = 2
BLOCK = 64

CASES = {
    "exact-3": {"stage": 3},
    # (its parameter shards in host memory, uploaded and then quantized; `all-3` quantizes on the device)
    "qwz": {"stage": 3, "quantized_weights": "int8", "offload_params": "cpu", "offload_optimizer": "cpu"},
    "hpz": {"stage": 3, "hpz_partition_size": NODE_SIZE},
    "qgz-3": {"stage": 3, "quantized_gradients": "int8"},
    "all-3": {
        "stage": 3,
        "quantized_weights": "int8",
        "hpz_partition_size": NODE_SIZE,
        "quantized_gradients": "int8",
    },
    "exact-2": {"stage": 2},
    "qgz-2": {"stage": 2, "quantized_gradients": "int8"},
}

# Checkpoints: saved halfway by these cases, then resumed with the options on and off.
SAVED = ("all-3", "exact-2")
RESUMED = {
    "all-3-resumed": ("all-3", CASES["all-3"]),
    "exact-3-from-all-3": ("all-3", CASES["exact-3"]),
    "qgz-2-from-exact-2": ("exact-2", CASES["qgz-2"]),
}


def _by_communicator(trace: list, forwards: list[range]) -> dict[str, int]:
    """Bytes each (communicator, operation) moved in total in one step's trace (all ranks' data,
    as the trace records the full-size side), gathers split into those of the forward passes (at
    positions in `forwards`) and the rest."""
    totals: dict[str, int] = {}
    for position, (op, comm, nbytes, _unit) in enumerate(trace):
        if op == "all_gather" and comm in ("gather", "hpz"):
            in_forward = any(position in span for span in forwards)
            op = "forward_gather" if in_forward else "backward_gather"
        key = f"{comm}:{op}"
        totals[key] = totals.get(key, 0) + nbytes
    return totals


def _forward_gather_against_reference(engine, model, batch) -> dict[str, float]:
    """What one forward computes on in the first layer unit, against the 16-bit weights after each
    rank's chunk of each bucket went through the reference int8 round trip: the largest difference
    to that and to the exact weights."""
    unit = next(u.index for u in engine.units if not u.is_root)
    segments = [g for g in engine.groups + engine.frozen if g.unit == unit]
    seen: list[torch.Tensor] = []
    hook = engine.units[unit].module.register_forward_pre_hook(
        lambda module, args: seen.extend(g.flat.detach().clone() for g in segments)
    )
    with torch.no_grad():
        model(**batch)
    hook.remove()
    to_reference = to_exact = 0.0
    with hf_zero.gathered_parameters([p for g in segments for p in g.params]):
        for segment, gathered in zip(segments, seen, strict=True):
            for bucket in segment.layout.buckets:
                exact = segment.layout.bucket_view(segment.flat, bucket).view(
                    engine.ctx.world_size, bucket.chunk
                )
                q, scales = quantize_int8_reference(exact, BLOCK)
                expected = dequantize_int8_reference(q, scales, BLOCK, torch.empty_like(exact))
                got = segment.layout.bucket_view(gathered, bucket).view_as(exact)
                to_reference = max(to_reference, (got.float() - expected.float()).abs().max().item())
                to_exact = max(to_exact, (got.float() - exact.float()).abs().max().item())
    return {"to_reference": to_reference, "to_exact": to_exact}


def zeropp_model() -> GPT2LMHeadModel:
    """The tiny GPT-2 of `tiny_models` with 4 layers: the default prefetch budget then gathers
    several units in one collective (the last three in forward, three in backward)."""
    config = build_model("gpt2").config
    config.n_layer = 4
    torch.manual_seed(0)
    return GPT2LMHeadModel(config)


def _engine(settings: dict):
    model = zeropp_model()
    config = {
        "precision": "bf16",
        "node_size": NODE_SIZE,
        "quantization_block": BLOCK,
        "reduce_bucket_size": 2_000,
        **settings,
    }
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    return model, optimizer, hf_zero.initialize(model, optimizer, config)


def _weights(engine) -> dict[str, torch.Tensor] | None:
    """The full fp32 weights on rank 0 (every rank takes part in gathering them)."""
    weights = engine.full_state_dict(keep=dist.get_rank() == 0)
    return {k: v.float() for k, v in weights.items()} if dist.get_rank() == 0 else None


def run_case(name: str, settings: dict, checkpoints: Path) -> dict:
    """Train a case; one of `SAVED` saves a checkpoint halfway, into `checkpoints / name`."""
    rank, world = dist.get_rank(), dist.get_world_size()
    model, optimizer, engine = _engine(settings)
    samples = make_samples("gpt2", MICRO_BATCH * world * 2)
    losses, trace, forwards, saved = [], [], [], None
    for step in range(STEPS):
        if step == STEPS // 2 and name in SAVED:
            engine.save_checkpoint(checkpoints / name)
            saved = _weights(engine)
        if step == STEPS - 1:
            trace = engine.trace_collectives()
            SPY.take()
        for micro in range(MICRO_BATCH):
            start = (micro * world + rank) * 2  # the same batches every step: the loss falls fast
            batch = slice_samples(samples, start, 2)
            begin = len(trace)
            loss = model(**batch).loss
            forwards.append(range(begin, len(trace)))
            engine.backward(loss)
            losses.append(loss.item())
        if step == 0:  # every case from the same weights: the reduced gradients compare directly
            first_grads = {name: hf_zero.full_grad(p) for name, p in model.named_parameters()}
        optimizer.step()
        optimizer.zero_grad()
    trace = list(trace)  # the last step's collectives, not the gathers of the weights below
    spied = SPY.take()
    batch = slice_samples(samples, 0, 2)
    gather_check = _forward_gather_against_reference(engine, model, batch) if settings["stage"] == 3 else None
    everyone = [None] * world
    dist.all_gather_object(everyone, trace)
    weights = _weights(engine)
    result = {
        "losses": losses,
        "bytes": _by_communicator(trace, forwards),
        "bytes_sent": dict(engine.last_step_comm_bytes_by_communicator),
        "spied": spied,
        "traces_agree": all(other == everyone[0] for other in everyone),
        "first_difference": first_difference(everyone),
        "memory": engine.memory_breakdown(),
        # Per segment: whether it is in the root unit, and the chunk size of each of its buckets.
        "segments": [
            [engine.units[g.unit].is_root, [b.chunk for b in g.layout.buckets]]
            for g in engine.groups + engine.frozen
        ],
        "weights": weights,
        "saved_weights": saved,
        "first_grads": {k: v.cpu() for k, v in first_grads.items()} if rank == 0 else None,
        "forward_gather": gather_check,
    }
    engine.close()
    return result


def resume_case(settings: dict, checkpoint: Path) -> dict:
    """Load `checkpoint` (saved halfway by a case of `SAVED`) under `settings` and train the rest of
    the way: the weights right after loading and the losses of the steps after it."""
    rank, world = dist.get_rank(), dist.get_world_size()
    model, optimizer, engine = _engine(settings)
    engine.load_checkpoint(checkpoint)
    loaded = _weights(engine)
    samples = make_samples("gpt2", MICRO_BATCH * world * 2)
    losses = []
    for _step in range(STEPS // 2, STEPS):
        for micro in range(MICRO_BATCH):
            loss = model(**slice_samples(samples, (micro * world + rank) * 2, 2)).loss
            engine.backward(loss)
            losses.append(loss.item())
        optimizer.step()
        optimizer.zero_grad()
    engine.close()
    return {"loaded_weights": loaded, "losses": losses}


def main(out: str) -> None:
    dist.init_process_group("gloo")
    SPY.install()
    checkpoints = Path(out).parent / "checkpoints"
    results = {name: run_case(name, settings, checkpoints) for name, settings in CASES.items()}
    resumed = {
        name: resume_case(settings, checkpoints / source) for name, (source, settings) in RESUMED.items()
    }
    if dist.get_rank() == 0:
        report: dict = {"resumed": {}}
        for name, result in resumed.items():
            saved = results[RESUMED[name][0]]["saved_weights"]
            report["resumed"][name] = {
                "losses": result["losses"],
                "load_difference": max(
                    (result["loaded_weights"][k] - saved[k]).abs().max().item() for k in saved
                ),
            }
        references = {stage: results[f"exact-{stage}"]["weights"] for stage in (2, 3)}
        references_grads = {stage: results[f"exact-{stage}"]["first_grads"] for stage in (2, 3)}
        for name, result in results.items():
            reference = references[2 if name.endswith("-2") else 3]
            result["max_weight_difference"] = max(
                (result["weights"][key] - reference[key]).abs().max().item() for key in reference
            )
            result["weight_scale"] = max(reference[key].abs().max().item() for key in reference)
            grads = references_grads[2 if name.endswith("-2") else 3]
            # Per tensor: the largest difference to the exact gradient, over the exact one's largest value.
            result["grad_error"] = max(
                (result["first_grads"][key] - grads[key]).abs().max().item() / grads[key].abs().max().item()
                for key in grads
            )
            del result["weights"], result["first_grads"], result["saved_weights"]
            report[name] = result
        with open(out, "w") as handle:
            json.dump(report, handle, indent=1)
    exit_cleanly()


if __name__ == "__main__":
    main(sys.argv[1])
