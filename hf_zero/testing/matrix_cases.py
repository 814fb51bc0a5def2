"""Which cases run at which world size: the multi-rank matrix the test suite launches.

One torchrun launch per world size runs all of that world's cases (start-up dominates on CPU).
"""

from __future__ import annotations

from .cases import Case
from .tiny_models import MODEL_NAMES

STAGES = (0, 1, 2, 3)

CORE_CASES = [
    Case(model, stage, precision, optimizer, accumulation, clipping)
    for model in MODEL_NAMES
    for stage in STAGES
    for precision, optimizer, accumulation, clipping in (
        ("fp32", "adamw", 1, 0.0),
        ("bf16", "adamw", 1, 0.0),
        ("fp32", "sgd", 2, 0.05),  # SGD is linear in the gradient: averaging errors show in full
    )
]
OPTIMIZER_CASES = [Case("gpt2", 2, "fp32", kind) for kind in ("adam", "rmsprop", "adagrad")] + [
    Case("gpt2", 0, "fp32", "adagrad"),  # state made before initialize, on an unsharded group
]
MIXED_CASES = [Case("llama", 2, "bf16", "adamw", accumulation=2, clipping=0.05)]
ACCELERATE_CASES = [
    Case("gpt2", 1, "fp32", "sgd", accumulation=2, clipping=0.05, loop="accelerate"),
    Case("llama", 2, "bf16", "adamw", loop="accelerate"),
]

# Ranks that use different parameters: rank 0 always takes branch 0 and rank 1 branch 1 at two
# ranks; single-bucket parameters make equal-sized buckets that could pair up wrongly.
ROUTED_CASES = [Case("branches", stage, "fp32", "sgd", bucket_size=1024) for stage in STAGES] + [
    Case("branches", 2, "fp32", "adamw", accumulation=2, bucket_size=1024),
    Case("branches", 2, "fp32", "sgd", bucket_size=1024, overlap=False),
    # Stage 3 with each branch a unit: each rank gathers a unit its data never runs.
    Case("branches", 3, "fp32", "sgd", bucket_size=1024, units="Sequential"),
    Case("branches", 3, "fp32", "adamw", accumulation=2, bucket_size=1024, units="Sequential"),
]
SHARED_LAYER_CASES = [
    Case("llama-shared", 2, "fp32", "sgd", accumulation=2),
    Case("llama-shared", 1, "fp32", "adamw"),
    Case("llama-shared", 2, "fp32", "sgd", overlap=False),
]
MOE_CASES = [Case("beam", 2, "bf16", "adamw"), Case("beam", 1, "fp32", "sgd", accumulation=2)]
LAYOUT_CASES = [
    Case("llama", 2, "fp32", "adamw_trainer"),
    Case("llama", 1, "bf16", "adamw_trainer", accumulation=2),
    Case("gpt2", 2, "fp32", "sgd", accumulation=2, bucket_size=0),  # one big bucket
    Case("gpt2", 1, "fp32", "sgd", bucket_size=0),
    Case("gpt2", 2, "fp32", "sgd", accumulation=2, bucket_size=1),  # one parameter per bucket
]
# bf16 with 8 micro-batches: every stage accumulates in fp32 (the plain loop records full_grad).
ACCUMULATION_CASES = [
    Case("llama", stage, "bf16", "sgd", accumulation=8, steps=2, micro_batch=1, loop="plain")
    for stage in STAGES
]
USER_PATH_CASES = [
    Case("gpt2", 2, "fp32", "adamw", accumulation=2, scenario="eval_between"),
    Case("gpt2", 2, "fp32", "sgd", accumulation=2, scenario="discard"),
    Case("llama", 1, "bf16", "adamw", scenario="discard", loop="accelerate"),
    Case("gpt2", 2, "fp32", "sgd", accumulation=2, clipping=0.05, loop="plain", scenario="discard"),
    Case("llama", 1, "fp32", "adamw", accumulation=2, clipping=0.05, loop="plain"),
    Case("llama", 0, "bf16", "sgd", clipping=0.05, loop="plain"),
    Case("llama", 2, "bf16", "adamw", scenario="load_state_dict"),
    Case("gpt2", 1, "fp32", "sgd", scenario="load_state_dict"),
    Case("gpt2", 2, "fp32", "adamw_fused", steps=4),
    Case("gpt2", 2, "fp32", "adamw_fused", steps=4, scenario="resume"),
    Case("llama", 1, "bf16", "adamw", steps=4),
    Case("llama", 1, "bf16", "adamw", steps=4, scenario="resume"),
]
STAGE3_CASES = [
    Case("llama-shared", 3, "fp32", "sgd", accumulation=2),  # one unit used three times, reentrant
    Case("llama-ckpt", 3, "fp32", "sgd", accumulation=2),  # non-reentrant checkpointing
    Case("llama-ckpt", 2, "fp32", "sgd"),
    Case("llama-deep", 3, "fp32", "adamw", accumulation=2),  # prefetch: one unit ahead
    Case("llama-deep", 3, "fp32", "sgd", prefetch_bytes=0),
    Case("llama-deep", 3, "bf16", "adamw", prefetch_bytes=160_000),  # two bf16 units ahead
    Case("beam", 3, "bf16", "adamw"),  # MoE: experts without tokens on some rank
    # (Mixtral: in the first step's data, samples 2-3 send no token to layer 1's expert 0.)
    Case("mixtral", 3, "fp32", "adamw", accumulation=2),
    Case("mixtral", 3, "bf16", "sgd", clipping=0.05),
    Case("llama", 3, "bf16", "adamw_trainer", accumulation=2, clipping=0.05),  # Trainer's two groups
    Case("gpt2-lora", 3, "fp32", "adamw"),  # frozen base sharded, adapters trained
    Case("gpt2-lora", 3, "bf16", "adamw", accumulation=2),
    Case("gpt2-lora", 2, "fp32", "adamw"),
    Case("gpt2", 3, "fp32", "adamw", accumulation=2, scenario="eval_between"),
    Case("gpt2", 3, "fp32", "sgd", accumulation=2, clipping=0.05, loop="plain", scenario="discard"),
    Case("llama", 3, "bf16", "adamw", scenario="load_state_dict"),
    Case("gpt2", 3, "fp32", "adamw_fused", steps=4),
    Case("gpt2", 3, "fp32", "adamw_fused", steps=4, scenario="resume"),
    Case("llama", 3, "fp32", "adamw", loop="accelerate"),
]
# Muon for the hidden matrices and AdamW for the rest (`matrix_step.py`): every stage, bf16 with
# accumulation and clipping, LoRA adapters, checkpoint resume, the Accelerate and plain loops.
# With SGD for the rest, two ranks in fp32 sum gradients exactly as the reference does, so the
# weights must match bit for bit: Newton–Schulz in bf16 turns any other difference into a visible one.
MUON_CASES = [Case("llama", stage, "fp32", "muon_sgd") for stage in STAGES] + [
    *(Case("llama", stage, "fp32", "muon") for stage in (2, 3)),
    Case("llama", 2, "bf16", "muon", accumulation=2, clipping=0.05),
    Case("gpt2", 3, "bf16", "muon", accumulation=2, clipping=0.05),
    Case("gpt2-lora", 3, "fp32", "muon"),
    Case("llama", 2, "fp32", "muon_sgd", steps=4, scenario="resume"),
    Case("llama", 3, "fp32", "muon_sgd", steps=4, scenario="resume"),
    Case("llama", 1, "fp32", "muon", loop="accelerate"),
    Case("llama", 2, "fp32", "muon", accumulation=2, clipping=0.05, loop="plain"),
]
# Adafactor: each parameter stepped whole at its owner (`whole_step.py`). Nothing in it rounds
# differently on two fp32 ranks, so those cases must match bit for bit.
WHOLE_PARAMETER_CASES = [Case("llama", stage, "fp32", "adafactor") for stage in STAGES] + [
    Case("llama", 2, "bf16", "adafactor", accumulation=2, clipping=0.05),
    Case("gpt2", 3, "bf16", "adafactor", accumulation=2, clipping=0.05),
    Case("gpt2-lora", 3, "fp32", "adafactor"),
    Case("llama", 3, "fp32", "adafactor", steps=4, scenario="resume"),
]
HARDENING_CASES = (
    ROUTED_CASES
    + SHARED_LAYER_CASES
    + MOE_CASES
    + LAYOUT_CASES
    + ACCUMULATION_CASES
    + USER_PATH_CASES
    + STAGE3_CASES
    + MUON_CASES
    + WHOLE_PARAMETER_CASES
)

CASES_BY_WORLD = {
    2: CORE_CASES + OPTIMIZER_CASES + MIXED_CASES + ACCELERATE_CASES + HARDENING_CASES,
    3: [
        Case("gpt2", stage, "fp32", optimizer, accumulation, clipping)
        for stage in STAGES
        for optimizer, accumulation, clipping in (("adamw", 1, 0.0), ("sgd", 2, 0.05))
    ]
    + [
        Case("branches", 2, "fp32", "sgd", bucket_size=1024),
        Case("llama-shared", 2, "fp32", "sgd"),
        Case("branches", 3, "fp32", "sgd", bucket_size=1024, units="Sequential"),
        # A unit's fp32 norms and bf16 weights are gathered and reduced as one collective per dtype.
        Case("fp32-norms", 3, "bf16", "adamw_trainer", accumulation=2, clipping=0.05),
        Case("fp32-norms", 2, "bf16", "adamw"),
        *(Case("gpt2", stage, "fp32", "muon") for stage in (1, 2, 3)),
        Case("llama", 3, "bf16", "muon", accumulation=2, clipping=0.05),
        *(Case("gpt2", stage, "fp32", "adafactor") for stage in (2, 3)),
    ],
    # Four ranks where four matters: shards split four ways (one model, every stage and setting;
    # the other models' core cases run at two ranks and GPT-2's at three) and two groups of two.
    4: [
        # Four ranks split each buffer into quarters: fp32 AdamW and SGD at every stage show the
        # 1/N state and the averaging; bf16 at 4 ranks is the sub-group case below.
        *(case for case in CORE_CASES if case.model == "llama" and case.precision == "fp32"),
        Case("gpt2", 2, "fp32", "sgd", accumulation=2, subgroups=2),
        Case("llama", 1, "bf16", "adamw", subgroups=2),
        Case("gpt2", 3, "fp32", "sgd", accumulation=2, subgroups=2),
    ],
}


def reference_world(case: Case, world: int) -> int:
    """The world size whose global batch the case's ranks train on together."""
    return world // case.subgroups if case.subgroups else world
