"""The launched half of tests/test_estimate.py: the engine's own byte accounting on gloo ranks.

One torchrun launch of three ranks runs every case for two optimizer steps (the two-rank cases on
a sub-group of ranks 0 and 1) and writes, per rank, `engine.memory_breakdown()`,
`engine.last_step_comm_bytes` and the bytes the collectives really carried (`CollectiveSpy`).

    python -m hf_zero.testing.estimate_checks OUT_DIR
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

BATCH, SEQ, STEPS = 2, 32, 2
TOLERANCE = 0.05


def tiny_config(model: str):
    """About a million parameters, so the padding of flat buffers (64-element boundaries, a multiple
    of the world size per bucket) stays far below the tolerance. GPT-2 ties its head to the embeddings."""
    if model == "llama":
        return LlamaConfig(
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=2048,
            max_position_embeddings=128,
        )
    return GPT2Config(
        n_embd=128, n_layer=4, n_head=4, vocab_size=2048, n_positions=128, bos_token_id=0, eos_token_id=0
    )


@dataclass(frozen=True)
class Case:
    world: int
    model: str
    stage: int
    offload_optimizer: str = "none"
    offload_params: str = "none"
    precision: str = "bf16"
    grad_accum: int = 1
    reduce_dtype: str = "auto"
    optimizer: str = "adamw"  # "muon": Muon for the hidden matrices, AdamW for the rest

    @property
    def name(self) -> str:
        offload = (
            f"-offload_{self.offload_optimizer}_{self.offload_params}"
            if self.offload_optimizer != "none"
            else ""
        )
        reduce = "-reduce_fp32" if self.reduce_dtype == "fp32" else ""
        muon = "-muon" if self.optimizer == "muon" else ""
        return (
            f"{self.world}ranks-{self.model}-stage{self.stage}-{self.precision}-acc{self.grad_accum}"
            f"{offload}{reduce}{muon}"
        )

    @property
    def offload(self) -> str:
        if self.offload_params != "none":
            return "optimizer+params"
        return "optimizer" if self.offload_optimizer != "none" else "none"


CASES = [
    *(Case(2, "llama", stage) for stage in range(4)),
    Case(2, "llama", 2, offload_optimizer="cpu"),
    Case(2, "llama", 3, offload_optimizer="cpu", offload_params="cpu"),
    Case(2, "llama", 2, grad_accum=2),  # fp32 gradients, one reduce-scatter per micro-batch
    Case(2, "llama", 0, precision="fp32"),  # the flat fp32 buffer is the master copy
    Case(3, "gpt2", 3),  # tied weights, a three-way split
    Case(3, "llama", 1, precision="fp16", offload_optimizer="cpu"),
    Case(2, "llama", 2, reduce_dtype="fp32"),  # fp32 gradients, staging and reduce-scatters
    Case(2, "llama", 3, reduce_dtype="fp32"),
    Case(2, "llama", 2, optimizer="muon"),  # one momentum per matrix element, two all-to-alls
    Case(3, "llama", 3, optimizer="muon"),
]


def _train(case: Case, group) -> dict:
    import hf_zero
    from hf_zero.testing.engine_matrix import SPY

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(case.model))
    if case.optimizer == "muon":
        optimizer = hf_zero.muon_with_adamw(model, lr=0.02, adamw_lr=1e-3)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    config = {
        "stage": case.stage,
        "precision": case.precision,
        "offload_optimizer": case.offload_optimizer,
        "offload_params": case.offload_params,
        "reduce_dtype": case.reduce_dtype,
    }
    engine = hf_zero.initialize(model, optimizer, config, process_group=group)
    ids = torch.randint(0, 2048, (BATCH, SEQ))
    comm, spied = [], []
    SPY.take()
    for _ in range(STEPS):
        for _ in range(case.grad_accum):
            engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()
        comm.append(engine.last_step_comm_bytes)
        spied.append(SPY.take())
    return {"memory": engine.memory_breakdown(), "comm": comm, "spied": spied}


def _launched(out_dir: str) -> None:
    import torch.distributed as dist

    from hf_zero.testing.engine_matrix import SPY
    from hf_zero.testing.launch import exit_cleanly

    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    SPY.install()
    rank = dist.get_rank()
    results = {}
    # The pair group exists before the three-rank engines are built, so rank 2 knows one group
    # fewer than ranks 0 and 1 when they create their own groups (a stage-3 engine makes a second
    # one for its gathers): the engine must still agree on that group's name on every rank.
    pair = dist.new_group([0, 1])  # every rank takes part in creating it
    for case in [case for case in CASES if case.world == 2]:
        if rank < 2:
            results[case.name] = _train(case, pair)
    for case in [case for case in CASES if case.world == 3]:
        results[case.name] = _train(case, None)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    exit_cleanly()


if __name__ == "__main__":
    _launched(sys.argv[1])
