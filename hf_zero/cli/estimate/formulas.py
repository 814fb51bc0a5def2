"""The model behind `hf-zero estimate`: memory per GPU and host, and communication per step, for
each ZeRO stage and offload choice, from a model's shape (`ModelShape`, read by `shape.py`:
tied weights once, split into the root unit, the untied input embedding, one unit per layer and
the untied head, as `core/units.py` cuts them).

The formulas follow the engine's own byte accounting (`ZeroEngine.memory_breakdown`, the bytes
`Collectives` counts into `engine.last_step_comm_bytes`), ignoring the padding of flat buffers to
64-element boundaries and to a multiple of the world size (see `layout.py`). With P parameters, W
ranks, b bytes per element in the compute dtype, r the bytes gradients are reduced in (b; 4 with
`reduce_dtype="fp32"`), g the bytes of a gradient element (r; 4 once a step accumulates several
micro-batches, which switches the gradient buffers to fp32), k optimizer
states (2 for Adam/AdamW), R and U the parameters of the root unit and of the largest layer unit,
and Z = W at stages 1-3 (1 at stage 0) the number of shards of masters and optimizer state,
bytes per GPU:

    weights          b*P          (stage 3: b*P/W, this rank's shard; 0 with parameter offload)
    masters          4*P/Z        (0 in fp32 at stages 0 and 3, where the weights or their shard are the
                                   masters; 0 offloaded)
    gradients        g*P          (stages 2-3 with W > 1: g*P/W, this rank's reduced shard)
    optimizer state  4*k*P/Z      (0 offloaded)
    staging          stage 3: r*(bucket(R) + 3*bucket(U)), the gradient buckets staged for their
                     reduce-scatter at once (the root's, reduced when backward ends, and the
                     units'; two more may be in flight); stage 2:
                     r*min(P, 4*bucket(P)), its segment spanning the layers
    gathered         stage 3: b*(R + U + n*U), the root unit (gathered for the whole forward and
                     backward), the layer running and n = max(1, 64 MiB // (b*U)) prefetched (the
                     default budget: one unit, and at least 64 MiB), at most b*P
    host (offload)   4*P/Z + 4*k*P/Z + 2*chunk*(g + b), the masters, optimizer state and two
                     staging buffer pairs of chunk = min(offload_chunk_size, largest segment's shard)
                     elements (below stage 3 the segment is P); with parameter offload also the
                     16-bit shard, b*P/W

where bucket(n) = min(n, max(reduce_bucket_size, the segment's largest tensor)): buckets hold whole
tensors.

Communication per GPU per optimizer step, counting as `Collectives` does (ring algorithms: a
reduce-scatter or all-gather of n bytes sends n*(W-1)/W, an all-reduce twice that), with f = (W-1)/W
and A micro-batches per step:

    stage 0   all-reduce of the gradients                2*g*P*f
    stage 1   reduce-scatter of the gradients at the step  g*P*f, then the all-gather of the
              updated weights b*P*f
    stage 2   a reduce-scatter per backward pass         A*r*P*f, then the all-gather b*P*f
    stage 3   a reduce-scatter per backward pass         A*r*P*f, and per micro-batch the gathers of
              every unit in forward and of every layer unit again in backward: A*b*(2*P - R - E)*f
              (the root stays gathered from forward to the end of backward, and the untied input
              embedding's E parameters are not needed in backward; there is no all-gather after the
              step: the updated shards are what the next forward gathers)

Time: a ring spanning several nodes crosses each node's network once per ring, so a node's network
interfaces together carry what one GPU sends (bytes/inter-node bandwidth per node), while each GPU's
own link carries the same bytes (bytes/intra-node bandwidth per GPU); the slower of the two bounds
the step's communication. Overlap with compute is not modelled.

Activations (saved for backward, per GPU, for a micro-batch of B sequences of S tokens, T = B*S),
fitted to what autograd saves for a Llama-style decoder (RMSNorm computed in fp32, fused SDPA/flash
attention, SwiGLU MLP): per layer T*(b*(8h + 4i + 2kv) + 2*(4-b)*h + 4*heads) and for the head
T*((4 + b)*V + (2b + 4)*h): the logits and the fp32 copy the loss keeps. With activation
checkpointing each layer keeps only its input (T*b*h) and one layer's activations are recomputed at
a time. Dropout masks and eager attention's S*S scores (GPT-2, BERT) come on top.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ...config.zero_config import MIN_PREFETCH_BYTES, ZeroConfig

PRECISION_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
# "optimizer": optimizer state and fp32 masters in host memory (offload_optimizer="cpu");
# "optimizer+params": the 16-bit parameter shards too (offload_params="cpu", stage 3 only).
OFFLOAD_CHOICES = ("none", "optimizer", "optimizer+params")
OFFLOAD_LABELS = {"none": "none", "optimizer": "opt->cpu", "optimizer+params": "opt+params->cpu"}
# About what an NVLink GPU gets out of a ring collective (300 GB/s), and a common datacentre network.
DEFAULT_INTRA_GBPS = 2400.0
DEFAULT_INTER_GBPS = 100.0
ADAM_STATES = 2  # exp_avg and exp_avg_sq, fp32, shaped like the master shard
# "muon": torch.optim.Muon for the hidden matrices (one fp32 momentum per element), AdamW for the rest.
OPTIMIZERS = ("adamw", "muon")
# The default prefetch budget holds one layer unit ahead, and at least MIN_PREFETCH_BYTES: a stage-3
# rank may hold the layer running and that much ahead (in backward a layer is released before the
# next starts).
# Gradient buckets that may be staged at once besides the root's: `BackwardReduceScatter` keeps at most
# two reduce-scatters in flight while the next bucket fills.
STAGED_BUCKETS = 3
# A share of the GPU above which a fitting combination is marked "tight": the estimate leaves out the
# CUDA context, the allocator's fragmentation and temporary buffers of the kernels.
TIGHT = 0.9


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs to know about a model: its trainable parameters as the engine lays
    them out (unique tensors, root unit and layer units) and the sizes activations scale with."""

    parameters: int
    root_parameters: int
    unit_parameters: tuple[int, ...]
    largest_root_tensor: int  # elements of the root unit's largest tensor (usually the embeddings)
    largest_unit_tensor: int  # and of the largest tensor in any layer unit
    hidden_size: int
    num_layers: int
    num_heads: int
    kv_size: int  # key/value width: key-value heads x head size (the hidden size without GQA)
    intermediate_size: int
    vocab_size: int
    name: str = "model"
    input_embedding: int = 0  # parameters of the untied input embedding's unit (gathered in forward only)
    muon_shapes: tuple[tuple[int, int], ...] = ()  # the hidden 2-D weights Muon would take

    @property
    def muon_parameters(self) -> int:
        """Elements of the hidden matrices (`hf_zero.integrations.muon.hidden_matrix_names`)."""
        return sum(rows * cols for rows, cols in self.muon_shapes)

    @property
    def largest_unit(self) -> int:
        """Parameters of the largest unit but the root (0 for a model cut into no units)."""
        return max(self.unit_parameters, default=0)

    @property
    def largest_layer(self) -> int:
        """Parameters of the largest unit gathered ahead of its use: every unit but the root and
        the input embedding (which is the first of the forward and not gathered in backward)."""
        layers = list(self.unit_parameters)
        if self.input_embedding:
            layers.remove(self.input_embedding)
        return max(layers, default=0)

    @property
    def largest_segment(self) -> int:
        """Parameters of the largest flat segment: with one param group, the largest unit, root included."""
        return max(self.root_parameters, self.largest_unit)


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per GPU (and, offloaded, in host memory per GPU) of one stage and offload choice."""

    weights: int
    masters: int
    gradients: int
    optimizer_state: int
    activations: int
    staging: int  # stages 2-3: gradient buckets waiting for their reduce-scatter
    gathered: int  # stage 3: units gathered at once
    host: int  # offload: masters, optimizer state, staging buffers (and parameter shards), per GPU

    @property
    def model_states(self) -> int:
        """Weights, masters, gradients and optimizer state: what ZeRO shards."""
        return self.weights + self.masters + self.gradients + self.optimizer_state

    @property
    def transient(self) -> int:
        """The most gradient staging and gathered parameters held at once."""
        return self.staging + self.gathered

    @property
    def device_total(self) -> int:
        """Everything the estimate counts on the GPU."""
        return self.model_states + self.activations + self.transient


@dataclass(frozen=True)
class CommEstimate:
    """Bytes each GPU sends per optimizer step, and how long that takes over each kind of link."""

    reduce_bytes: int  # gradient reduction (all-reduce, or reduce-scatters)
    gather_bytes: int  # parameter all-gathers (after the step, or stage 3's gathers)
    intra_seconds: float | None  # over the GPU's own link (None: one GPU per node)
    inter_seconds: float | None  # through the node's network (None: one node)
    exchange_bytes: int = 0  # Muon: the all-to-alls to each matrix's owner and back

    @property
    def total_bytes(self) -> int:
        return self.reduce_bytes + self.gather_bytes + self.exchange_bytes

    @property
    def seconds(self) -> float:
        """The slower of the two links bounds the step's communication."""
        return max((t for t in (self.intra_seconds, self.inter_seconds) if t is not None), default=0.0)


@dataclass(frozen=True)
class Estimate:
    """Memory and communication of one ZeRO stage and offload choice."""

    stage: int
    offload: str
    world_size: int
    gpus_per_node: int
    memory: MemoryEstimate
    comm: CommEstimate

    @property
    def host_per_node(self) -> int:
        """Host memory the offloaded state takes on each node."""
        return self.memory.host * self.gpus_per_node

    def fit(self, gpu_memory: int) -> str:
        """Whether the GPU total fits in `gpu_memory` bytes: "yes", "tight" (above `TIGHT` of it) or "no"."""
        total = self.memory.device_total
        if total > gpu_memory:
            return "no"
        return "tight" if total > TIGHT * gpu_memory else "yes"


def _bucket(numel: int, largest_tensor: int, bucket_size: int) -> int:
    """The largest gradient bucket of a segment of `numel` parameters: buckets hold whole tensors."""
    return min(numel, max(bucket_size, largest_tensor))


def activation_bytes(
    shape: ModelShape, batch: int, seq: int, precision: str = "bf16", checkpointing: bool = False
) -> int:
    """Bytes autograd saves for backward in one micro-batch of `batch` x `seq` tokens (see the module
    docstring for the formula and what it leaves out)."""
    b = PRECISION_BYTES[_check_precision(precision)]
    tokens = batch * seq
    h, i, kv = shape.hidden_size, shape.intermediate_size, shape.kv_size
    # Norms upcast to fp32 and keep that copy besides the b-byte one; SDPA keeps an fp32 logsumexp per head.
    per_layer = tokens * (b * (8 * h + 4 * i + 2 * kv) + 2 * (4 - b) * h + 4 * shape.num_heads)
    head = tokens * ((4 + b) * shape.vocab_size + (2 * b + 4) * h)
    if checkpointing:
        return shape.num_layers * tokens * b * h + per_layer + head
    return shape.num_layers * per_layer + head


def estimate(
    shape: ModelShape,
    stage: int,
    offload: str = "none",
    *,
    gpus: int = 1,
    nodes: int = 1,
    precision: str = "bf16",
    batch: int = 1,
    seq: int = 2048,
    grad_accum: int = 1,
    checkpointing: bool = False,
    intra_gbps: float = DEFAULT_INTRA_GBPS,
    inter_gbps: float = DEFAULT_INTER_GBPS,
    reduce_bucket_size: int = ZeroConfig.reduce_bucket_size,
    reduce_dtype: str = ZeroConfig.reduce_dtype,
    offload_chunk_size: int = ZeroConfig.offload_chunk_size,
    optimizer_states: int = ADAM_STATES,
    optimizer: str = "adamw",
) -> Estimate:
    """Memory per GPU and communication per optimizer step of training `shape` at ZeRO `stage` with
    `offload` ("none", "optimizer", "optimizer+params") on `nodes` nodes of `gpus` GPUs each.

    `batch` x `seq` is the micro-batch per GPU and `grad_accum` the micro-batches per optimizer step;
    `intra_gbps` is each GPU's link inside a node and `inter_gbps` each node's network, in Gbit/s.
    Every parameter is trained, in one param group, with an optimizer keeping `optimizer_states`
    fp32 tensors per element (2: Adam, AdamW); `optimizer="muon"` trains the hidden matrices with
    Muon instead (one momentum per element, plus two bf16 all-to-alls of them per step between
    stages 1-3's shards and each matrix's owner). The formulas are in the module docstring. Raises
    `ValueError` for a combination the engine refuses or a value out of range.
    """
    _check_choices(stage, offload, precision)
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer {optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
    if optimizer == "muon" and offload != "none":
        raise ValueError("Muon runs on the GPU with hf_zero: no optimizer offload")
    for name, value in (("gpus", gpus), ("nodes", nodes), ("batch", batch), ("seq", seq)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    if grad_accum < 1:
        raise ValueError(f"grad_accum must be at least 1, got {grad_accum}")
    if intra_gbps <= 0 or inter_gbps <= 0:
        raise ValueError("link bandwidths must be positive")
    world = gpus * nodes
    b = PRECISION_BYTES[precision]
    # A second micro-batch switches the gradient buffers to fp32 (see `grad_sync.py`).
    # ZeroConfig.reduce_dtype="fp32": gradients are staged, summed and kept in fp32 (r bytes).
    r = 4 if reduce_dtype == "fp32" else b
    g = r if grad_accum == 1 else 4
    P, R, U = shape.parameters, shape.root_parameters, shape.largest_unit
    shards = world if stage >= 1 else 1  # stage 0 keeps whole masters and optimizer state everywhere
    offloaded = offload != "none"
    # Stages 2-3 keep only the reduced shard; in a world of one the engine reduces at the step instead.
    scatters_in_backward = stage >= 2 and world > 1

    weights = 0 if offload == "optimizer+params" else (b * P // world if stage == 3 else b * P)
    # fp32: at stage 0 the compute buffer is the master copy, at stage 3 this rank's shard is.
    fp32_weights_are_masters = precision == "fp32" and stage in (0, 3)
    masters = 0 if offloaded or fp32_weights_are_masters else 4 * P // shards
    gradients = g * P // world if scatters_in_backward else g * P
    M = shape.muon_parameters if optimizer == "muon" else 0
    optimizer_state = 0 if offloaded else 4 * (optimizer_states * (P - M) + M) // shards
    staging = 0
    if scatters_in_backward and stage == 2:
        # One segment spanning the layers: its buckets follow reduce_bucket_size alone.
        largest_tensor = max(shape.largest_root_tensor, shape.largest_unit_tensor)
        staging = r * min(P, (1 + STAGED_BUCKETS) * _bucket(P, largest_tensor, reduce_bucket_size))
    elif scatters_in_backward:
        root_bucket = _bucket(R, shape.largest_root_tensor, reduce_bucket_size)
        layer_bucket = _bucket(shape.largest_layer, shape.largest_unit_tensor, reduce_bucket_size)
        # The input embedding's gradient is reduced when the backward pass ends, with the root's,
        # while the last layers' reductions may still be under way.
        embedding_bucket = _bucket(shape.input_embedding, shape.input_embedding, reduce_bucket_size)
        staging = r * min(P, root_bucket + embedding_bucket + STAGED_BUCKETS * layer_bucket)
    # The root, the unit running and the prefetch budget (the largest unit gathered ahead, at least
    # MIN_PREFETCH_BYTES): the input embedding runs first, with the layers gathered ahead of it.
    L = shape.largest_layer
    ahead = L * max(1, MIN_PREFETCH_BYTES // (b * L)) if L else 0
    gathered = b * min(P, R + U + ahead) if stage == 3 else 0
    host = 0
    if offloaded:
        # Below stage 3 one segment spans the layers (one param group here).
        largest_segment = shape.largest_segment if stage == 3 else P
        chunk = min(offload_chunk_size, max(1, math.ceil(largest_segment / shards)))
        host = 4 * P // shards + 4 * optimizer_states * P // shards + 2 * chunk * (g + b)
        if offload == "optimizer+params":
            host += b * P // world
    memory = MemoryEstimate(
        weights=weights,
        masters=masters,
        gradients=gradients,
        optimizer_state=optimizer_state,
        activations=activation_bytes(shape, batch, seq, precision, checkpointing),
        staging=staging,
        gathered=gathered,
        host=host,
    )

    share = (world - 1) / world
    if stage == 0:
        reduce, gather = 2 * g * P * share, 0.0
    elif stage == 1:
        reduce, gather = g * P * share, b * P * share
    elif stage == 2:
        reduce, gather = grad_accum * r * P * share, b * P * share
    else:
        E = shape.input_embedding
        reduce, gather = grad_accum * r * P * share, grad_accum * b * (2 * P - R - E) * share
    # Muon: each GPU sends its (W-1)/W share of the pieces of others' matrices in its shard, and back
    # those of its own matrices in others' shards: 2 bytes each way (stage 0 holds whole matrices).
    exchange = 2 * 2 * M * share / world if stage >= 1 else 0.0
    total = reduce + gather + exchange
    # Gbit/s -> bytes/s.
    intra = total / (intra_gbps * 1e9 / 8) if gpus > 1 else None
    inter = total / (inter_gbps * 1e9 / 8) if nodes > 1 else None
    comm = CommEstimate(round(reduce), round(gather), intra, inter, round(exchange))
    return Estimate(stage, offload, world, gpus, memory, comm)


def estimate_all(shape: ModelShape, **options: Any) -> list[Estimate]:
    """`estimate` for every stage (0-3) and offload choice the engine accepts (parameter offload at
    stage 3 only), in that order; `options` are `estimate`'s keyword arguments."""
    muon = options.get("optimizer") == "muon"  # (Muon refuses optimizer offload)
    return [
        estimate(shape, stage, offload, **options)
        for stage in range(4)
        for offload in OFFLOAD_CHOICES
        if (offload != "optimizer+params" or stage == 3) and not (muon and offload != "none")
    ]


def _check_precision(precision: str) -> str:
    if precision not in PRECISION_BYTES:
        raise ValueError(f"precision {precision!r} is not one of {', '.join(PRECISION_BYTES)}")
    return precision


def _check_choices(stage: int, offload: str, precision: str) -> None:
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"stage must be 0, 1, 2 or 3, got {stage!r}")
    if offload not in OFFLOAD_CHOICES:
        raise ValueError(f"offload {offload!r} is not one of {', '.join(OFFLOAD_CHOICES)}")
    if offload == "optimizer+params" and stage != 3:
        raise ValueError("parameters are sharded, and so offloadable, only at stage 3")
    _check_precision(precision)
