"""`hf-zero estimate`: what each ZeRO stage and offload choice costs, before anything is trained.

    hf-zero estimate MODEL_OR_CONFIG [--gpus N] [--nodes M] [--batch B] [--seq S] [--precision bf16]
                     [--gpu-memory 80GB] [--intra-gbps 2400] [--inter-gbps 100] [--grad-accum K]

The model is read from a config.json, a model folder or a Hub id already in the local Hugging Face
cache (no download, no weights) and built on the meta device, so its parameters are counted as the
engine lays them out: tied weights once, split into the root unit (head, final norm, tied
embeddings, weights shared across layers), the untied input embedding and one unit per layer (see
`units.py`).

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
                     reduce-scatter at once (the root's fills from the head's gradient to the
                     embeddings', the end of backward; two more may be in flight); stage 2:
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

import argparse
import contextlib
import math
import os
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from .config import MIN_PREFETCH_BYTES, ZeroConfig

PRECISION_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
# "optimizer": optimizer state and fp32 masters in host memory (offload_optimizer="cpu");
# "optimizer+params": the 16-bit parameter shards too (offload_params="cpu", stage 3 only).
OFFLOAD_CHOICES = ("none", "optimizer", "optimizer+params")
OFFLOAD_LABELS = {"none": "none", "optimizer": "opt->cpu", "optimizer+params": "opt+params->cpu"}
# About what an NVLink GPU gets out of a ring collective (300 GB/s), and a common datacentre network.
DEFAULT_INTRA_GBPS = 2400.0
DEFAULT_INTER_GBPS = 100.0
ADAM_STATES = 2  # exp_avg and exp_avg_sq, fp32, shaped like the master shard
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

    @property
    def total_bytes(self) -> int:
        return self.reduce_bytes + self.gather_bytes

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
) -> Estimate:
    """Memory per GPU and communication per optimizer step of training `shape` at ZeRO `stage` with
    `offload` ("none", "optimizer", "optimizer+params") on `nodes` nodes of `gpus` GPUs each.

    `batch` x `seq` is the micro-batch per GPU and `grad_accum` the micro-batches per optimizer step;
    `intra_gbps` is each GPU's link inside a node and `inter_gbps` each node's network, in Gbit/s.
    Every parameter is trained, in one param group, with an optimizer keeping `optimizer_states`
    fp32 tensors per element (2: Adam, AdamW). The formulas are in the module docstring. Raises
    `ValueError` for a combination the engine refuses or a value out of range.
    """
    _check_choices(stage, offload, precision)
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
    optimizer_state = 0 if offloaded else 4 * optimizer_states * P // shards
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
    total = reduce + gather
    # Gbit/s -> bytes/s.
    intra = total / (intra_gbps * 1e9 / 8) if gpus > 1 else None
    inter = total / (inter_gbps * 1e9 / 8) if nodes > 1 else None
    comm = CommEstimate(round(reduce), round(gather), intra, inter)
    return Estimate(stage, offload, world, gpus, memory, comm)


def estimate_all(shape: ModelShape, **options: Any) -> list[Estimate]:
    """`estimate` for every stage (0-3) and offload choice the engine accepts (parameter offload at
    stage 3 only), in that order; `options` are `estimate`'s keyword arguments."""
    return [
        estimate(shape, stage, offload, **options)
        for stage in range(4)
        for offload in OFFLOAD_CHOICES
        if offload != "optimizer+params" or stage == 3
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


# ---- reading a model --------------------------------------------------------------------------------


class EstimateError(ValueError):
    """Bad input to `hf-zero estimate`; the message names the problem and the fix."""


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' warnings about configs it builds (unused tokens and the like)."""
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


def load_config(source: str | os.PathLike) -> Any:
    """The `transformers` config of a config.json file, a model folder, or a Hub id found in the
    local Hugging Face cache (nothing is downloaded). Raises `EstimateError` naming what is wrong."""
    from transformers import AutoConfig

    text = os.fspath(source)
    path = os.path.expanduser(text)
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        raise EstimateError(
            f"{text} is a folder without a config.json; pass a model folder saved with save_pretrained, "
            "or the config.json itself"
        )
    exists = os.path.exists(path)
    if not exists and (not _HUB_ID.match(text) or text.endswith(".json")):
        raise EstimateError(f"{text}: no such file or folder; pass a config.json, a model folder or a Hub id")
    try:
        with _quiet_transformers():
            return AutoConfig.from_pretrained(path if exists else text, local_files_only=True)
    except OSError as error:
        if exists:
            raise EstimateError(f"cannot read a model config from {text}: {_first_line(error)}") from error
        from huggingface_hub import constants

        raise EstimateError(
            f"{text} is neither a file or folder here nor a Hub model id in the local Hugging Face cache "
            f"({constants.HF_HUB_CACHE}); fetch its config first (hf download {text} config.json) or pass a "
            "config.json or a model folder"
        ) from error
    except (ValueError, KeyError) as error:
        raise EstimateError(
            f"{text} is not a model config transformers knows ({_first_line(error)}); it needs a model_type "
            "such as 'llama' or 'gpt2'"
        ) from error


def _first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def _meta_model(config: Any) -> Any:
    """The model `config` describes, built on the meta device (no memory, no weights): the class its
    `architectures` names, else a causal LM, else a masked LM (BERT-type configs), else a
    sequence-to-sequence LM (T5-type), else the base model."""
    import torch
    import transformers

    candidates = [
        getattr(transformers, name, None) for name in (getattr(config, "architectures", None) or [])
    ]
    candidates = [c for c in candidates if c is not None and hasattr(c, "_from_config")]
    candidates += [
        transformers.AutoModelForCausalLM,
        transformers.AutoModelForMaskedLM,
        transformers.AutoModelForSeq2SeqLM,
        transformers.AutoModel,
    ]
    failures = []
    for candidate in candidates:
        try:
            with _quiet_transformers(), torch.device("meta"):
                # Auto classes build with from_config, model classes with _from_config.
                build = getattr(candidate, "from_config", None) or candidate._from_config
                return build(config)
        except Exception as error:  # building an arbitrary architecture fails in many ways: report each
            failures.append(f"{getattr(candidate, '__name__', candidate)}: {_first_line(error)}")
    raise EstimateError(
        f"transformers cannot build a model for this {type(config).__name__} ({'; '.join(failures)[:300]}); "
        "pass the config of a causal LM, a masked LM or a base model transformers supports"
    )


def model_shape(config: Any) -> ModelShape:
    """Count `config`'s model as the engine lays it out: built on the meta device, unique tensors
    (tied weights once), split into units with the engine's own `find_units`."""
    from torch import nn

    from .units import find_units

    model = _meta_model(config)
    params = list(model.parameters())  # each tensor once, however often it is tied
    units = find_units(model)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config

    def attribute(*names: str, default: int = 0) -> int:
        for name in names:
            value = getattr(text, name, None)
            if isinstance(value, int) and value > 0:
                return value
        return default

    hidden = attribute("hidden_size", "d_model", "n_embd")
    heads = attribute("num_attention_heads", "n_head", default=1)
    head_dim = attribute("head_dim", default=max(1, hidden // heads))
    return ModelShape(
        parameters=sum(p.numel() for p in params),
        root_parameters=sum(p.numel() for p in units[0].params),
        unit_parameters=tuple(sum(p.numel() for p in unit.params) for unit in units[1:]),
        largest_root_tensor=max((p.numel() for p in units[0].params), default=0),
        largest_unit_tensor=max((p.numel() for unit in units[1:] for p in unit.params), default=0),
        hidden_size=hidden,
        num_layers=attribute("num_hidden_layers", "n_layer", "num_layers", default=len(units) - 1),
        num_heads=heads,
        kv_size=attribute("num_key_value_heads", default=heads) * head_dim,
        # GPT-2 names it n_inner and leaves it None for the usual 4 x hidden.
        intermediate_size=attribute("intermediate_size", "n_inner", "ffn_dim", "d_ff", default=4 * hidden),
        vocab_size=attribute("vocab_size"),
        name=type(model).__name__,
        input_embedding=sum(
            p.numel() for unit in units[1:] if isinstance(unit.module, nn.Embedding) for p in unit.params
        ),
    )


# ---- the command ------------------------------------------------------------------------------------

_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_size(text: str) -> int:
    """Bytes of a size such as "80GB" (10^9), "80GiB" (2^30) or "512MB"; a bare number is in GB."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(f"{text!r} is not a size: use a number and a unit, e.g. 80GB, 80GiB or 24576MiB")
    number = float(match.group(1))
    return round(number * (_UNITS[unit] if unit else 10**9))


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return value


def _bandwidth(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a bandwidth: give Gbit/s as a positive number")
    return value


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from error


class _Usage(Exception):
    """A bad command line, already reported."""


class _Parser(argparse.ArgumentParser):
    """argparse, reporting a bad command line in one line (with the fix) rather than usage plus error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"{self.prog}: {message} (see {self.prog} --help)", file=sys.stderr)
        raise _Usage


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="hf-zero estimate",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Estimate, for every ZeRO stage (0-3) and offload choice, the memory per GPU and per node and\n"
            "the communication per optimizer step, and which combinations fit the GPU. Every parameter is\n"
            "trained with AdamW (two fp32 states per element); only the config is read, no weights."
        ),
        epilog=(
            "Sizes: GB = 10^9 bytes, GiB = 2^30 (a bare number is GB); the tables print GiB or MiB.\n"
            "'tight': the estimate fits but takes over 90% of the GPU, which also needs room for the\n"
            "CUDA context, allocator fragmentation and kernels' temporary buffers.\n"
            "Communication counts ring collectives as the engine does (engine.last_step_comm_bytes);\n"
            "its time is bytes / the slower of the GPU's intra-node link and (on several nodes) the\n"
            "node's network, with no overlap with compute."
        ),
    )
    parser.add_argument(
        "model",
        metavar="MODEL_OR_CONFIG",
        help="a config.json, a model folder, or a Hub id already in the local Hugging Face cache",
    )
    parser.add_argument(
        "--gpus", type=_positive_int, default=1, metavar="N", help="GPUs per node (default 1)"
    )
    parser.add_argument(
        "--nodes",
        type=_positive_int,
        default=1,
        metavar="M",
        help="nodes (default 1); world size = gpus x nodes",
    )
    parser.add_argument(
        "--batch",
        type=_positive_int,
        default=1,
        metavar="B",
        help="micro-batch per GPU, in sequences (default 1)",
    )
    parser.add_argument(
        "--seq", type=_positive_int, default=2048, metavar="S", help="tokens per sequence (default 2048)"
    )
    parser.add_argument(
        "--grad-accum",
        type=_positive_int,
        default=1,
        metavar="K",
        help="micro-batches per optimizer step (default 1); more keep gradients in fp32, and stages 2-3 "
        "reduce once per micro-batch",
    )
    parser.add_argument(
        "--precision", choices=list(PRECISION_BYTES), default="bf16", help="compute precision (default bf16)"
    )
    parser.add_argument(
        "--checkpointing",
        action="store_true",
        help="activation checkpointing per layer (model.gradient_checkpointing_enable())",
    )
    parser.add_argument(
        "--gpu-memory",
        type=_size,
        default="80GB",
        metavar="SIZE",
        help="memory of one GPU, e.g. 80GB, 24GiB (default 80GB)",
    )
    parser.add_argument(
        "--intra-gbps",
        type=_bandwidth,
        default=DEFAULT_INTRA_GBPS,
        metavar="GBPS",
        help=f"each GPU's link to the others in its node, Gbit/s (default {DEFAULT_INTRA_GBPS:g}: "
        "NVLink-class, 300 GB/s; PCIe 4.0 x16 is about 200)",
    )
    parser.add_argument(
        "--inter-gbps",
        type=_bandwidth,
        default=DEFAULT_INTER_GBPS,
        metavar="GBPS",
        help=f"each node's network, all its NICs together, Gbit/s (default {DEFAULT_INTER_GBPS:g}; "
        "8 x 400 Gb/s InfiniBand is 3200)",
    )
    return parser


def _unit_for(largest: float) -> tuple[str, float]:
    for name, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if largest >= size:
            return name, size
    return "B", 1


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 1:
        return f"{value:.2f} s"
    if value >= 1e-3:
        return f"{value * 1e3:.1f} ms"
    return f"{value * 1e6:.1f} us"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Columns aligned: the first two to the left, numbers to the right."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = []
    for row in [header, *rows]:
        cells = [
            cell.ljust(width) if i < 2 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    return lines


def format_report(shape: ModelShape, estimates: Sequence[Estimate], options: argparse.Namespace) -> str:
    """The tables `hf-zero estimate` prints."""
    first = estimates[0]
    world = first.world_size
    b = PRECISION_BYTES[options.precision]
    units = len(shape.unit_parameters)
    weights_name, weights_size = _unit_for(shape.parameters * b)
    lines = [
        f"{shape.name}: {shape.parameters:,} parameters ({shape.parameters * b / weights_size:.2f} {weights_name} in "
        f"{options.precision}); root unit {shape.root_parameters:,} (head, final norm, tied weights), "
        f"{units} unit(s) of up to {shape.largest_unit:,} (layers, untied input embedding)",
        f"{options.nodes} node(s) x {options.gpus} GPU(s) = {world} rank(s); {options.precision}; AdamW; "
        f"micro-batch {options.batch} x {options.seq} tokens per GPU, {options.grad_accum} per step"
        + ("; activation checkpointing" if options.checkpointing else ""),
        "",
    ]
    name, size = _unit_for(max(max(e.memory.device_total, e.host_per_node) for e in estimates))

    def show(value: int) -> str:
        return f"{value / size:.2f}"

    lines.append(
        f"Memory per GPU in {name} (fits: GPU total within --gpu-memory = {options.gpu_memory / size:.2f} "
        f"{name}; host = offloaded state in CPU memory)"
    )
    header = [
        "stage", "offload", "weights", "masters", "grads", "optim", "activ", "transient",
        "GPU total", "fits", "host/GPU", "host/node",
    ]  # fmt: skip
    rows = []
    for e in estimates:
        m = e.memory
        rows.append(
            [
                str(e.stage),
                OFFLOAD_LABELS[e.offload],
                show(m.weights),
                show(m.masters),
                show(m.gradients),
                show(m.optimizer_state),
                show(m.activations),
                show(m.transient),
                show(m.device_total),
                e.fit(options.gpu_memory),
                show(m.host),
                show(e.host_per_node),
            ]
        )
    lines += _table(header, rows)
    lines.append(
        "transient: gradient buckets staged for their reduce-scatter (stages 2-3), units gathered (stage 3)"
    )
    lines.append("")

    per_stage = {e.stage: e.comm for e in estimates}  # offload moves no collective
    comm_name, comm_size = _unit_for(max(c.total_bytes for c in per_stage.values()))
    inter = f", inter-node {options.inter_gbps:g} Gb/s per node" if options.nodes > 1 else ""
    lines.append(
        f"Communication per GPU per optimizer step in {comm_name} (intra-node {options.intra_gbps:g} Gb/s "
        f"per GPU{inter})"
    )
    header = ["stage", "collectives", "reduce", "gather", "total", "intra-node", "inter-node", "time"]
    collectives = {
        0: "all-reduce grads",
        1: "reduce-scatter + all-gather",
        2: "reduce-scatter in backward + all-gather",
        3: "reduce-scatter + gathers fwd/bwd",
    }
    rows = [
        [
            str(stage),
            collectives[stage],
            f"{c.reduce_bytes / comm_size:.2f}",
            f"{c.gather_bytes / comm_size:.2f}",
            f"{c.total_bytes / comm_size:.2f}",
            _seconds(c.intra_seconds),
            _seconds(c.inter_seconds),
            _seconds(c.seconds),
        ]
        for stage, c in per_stage.items()
    ]
    lines += _table(header, rows)
    if world == 1:
        lines.append("(one rank: nothing is communicated; add --gpus or --nodes)")
    elif options.nodes > 1:
        slower = options.inter_gbps < options.intra_gbps or options.gpus == 1
        lines.append(
            "the inter-node network bounds the step's communication"
            if slower
            else "the intra-node links bound the step's communication"
        )
    return "\n".join(lines)


def estimate_command(argv: list[str]) -> int:
    """`hf-zero estimate`: print the memory and communication tables; 2 on bad input (one line on
    stderr saying what is wrong and what to do)."""
    parser = _parser()
    try:
        options = parser.parse_args(argv)
    except _Usage:
        return 2
    except SystemExit as exit:  # --help
        return int(exit.code or 0)
    try:
        shape = model_shape(load_config(options.model))
        estimates = estimate_all(
            shape,
            gpus=options.gpus,
            nodes=options.nodes,
            precision=options.precision,
            batch=options.batch,
            seq=options.seq,
            grad_accum=options.grad_accum,
            checkpointing=options.checkpointing,
            intra_gbps=options.intra_gbps,
            inter_gbps=options.inter_gbps,
        )
    except (EstimateError, ValueError) as error:
        print(f"hf-zero estimate: {error}", file=sys.stderr)
        return 2
    print(format_report(shape, estimates, options))
    return 0
