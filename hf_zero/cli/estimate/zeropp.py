"""ZeRO++ in `hf-zero estimate`: the bytes each GPU sends per optimizer step at stage 3 with each of
qwZ, hpZ and qgZ (`hf_zero.engine.zeropp`), how much of it crosses nodes, and the time.

With the notation of `formulas.py` (P parameters, R in the root unit, E in an untied input
embedding, b bytes per element, r the reduction's, A micro-batches per step, W = L × N ranks in N
nodes of L, f = (W-1)/W) and s = 4/block (one fp32 scale per block of int8), per GPU per step:

    forward gathers    A*b*P*f            qwZ: A*(b*R + (1+s)*(P-R))*f   (the root stays 16-bit)
    backward gathers   A*b*(P-R-E)*f      hpZ: the same bytes, A*b*(P-R-E)*(L-1)/L, inside the node
    reduction          A*r*P*f            qgZ: A*(1+s)*P*(L-1)/L inside the node, then
                                               A*(1+s)*(P/L)*(N-1)/N across nodes
    hpZ's copy         b*(P-R)/L bytes of memory per GPU (`memory_breakdown()["hpz_secondary"]`)

The node's network: a ring spanning the nodes crosses each node's network once, so it carries what
one GPU sends in such collectives (as `formulas.py` models it); qgZ's second all-to-all sends every
GPU's bytes off the node, so the network carries L times one GPU's. Node-local collectives (hpZ's
gathers, qgZ's first all-to-all) only load the GPUs' own links.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...config.zero_config import ZeroConfig
from .formulas import DEFAULT_INTER_GBPS, DEFAULT_INTRA_GBPS, PRECISION_BYTES, ModelShape

# Each row of the table: which options are on.
OPTION_SETS = {
    "none": (),
    "qwZ": ("qwz",),
    "hpZ": ("hpz",),
    "qgZ": ("qgz",),
    "qwZ+hpZ+qgZ": ("qwz", "hpz", "qgz"),
}


@dataclass(frozen=True)
class ZeroPlusPlusEstimate:
    """Bytes per GPU per optimizer step at stage 3 with one set of ZeRO++ options, and its time."""

    label: str
    forward_gather: int
    backward_gather: int
    reduce: int
    node_local: int  # of the bytes above, those sent inside the node only
    node_network: int  # bytes the node's network carries per step, per node
    secondary_bytes: int  # hpZ's copy of the weights, per GPU
    intra_seconds: float | None
    inter_seconds: float | None

    @property
    def total_bytes(self) -> int:
        return self.forward_gather + self.backward_gather + self.reduce

    @property
    def seconds(self) -> float:
        """The slower of the two links bounds the step's communication."""
        return max((t for t in (self.intra_seconds, self.inter_seconds) if t is not None), default=0.0)


def zeropp_estimate(
    shape: ModelShape,
    options: tuple[str, ...],
    *,
    gpus: int,
    nodes: int,
    precision: str = "bf16",
    grad_accum: int = 1,
    reduce_dtype: str = ZeroConfig.reduce_dtype,
    block: int = ZeroConfig.quantization_block,
    intra_gbps: float = DEFAULT_INTRA_GBPS,
    inter_gbps: float = DEFAULT_INTER_GBPS,
    label: str = "",
) -> ZeroPlusPlusEstimate:
    """Stage 3 on `nodes` nodes of `gpus` GPUs with `options` (any of "qwz", "hpz", "qgz"; hpZ's
    partition is the node); the formulas are in the module docstring."""
    unknown = set(options) - {"qwz", "hpz", "qgz"}
    if unknown:
        raise ValueError(f"unknown ZeRO++ option(s) {sorted(unknown)}: expected qwz, hpz, qgz")
    L, N = gpus, nodes
    W = L * N
    b = PRECISION_BYTES[precision]
    r = 4 if reduce_dtype == "fp32" else b
    A, s = grad_accum, 4 / block
    P, R, E = shape.parameters, shape.root_parameters, shape.input_embedding
    f = (W - 1) / W
    forward = A * (b * R + (1 + s) * (P - R)) * f if "qwz" in options else A * b * P * f
    backward = A * b * (P - R - E)
    spanning = forward  # bytes of ring collectives across all ranks (and so across nodes)
    to_other_nodes = 0.0  # bytes of all-to-alls between nodes, per GPU
    if "hpz" in options:
        backward *= (L - 1) / L
        local = backward
    else:
        backward *= f
        spanning += backward
        local = 0.0
    if "qgz" in options:
        intra = A * (1 + s) * P * (L - 1) / L
        to_other_nodes = A * (1 + s) * (P / L) * (N - 1) / N
        reduce = intra + to_other_nodes
        local += intra
    else:
        reduce = A * r * P * f
        spanning += reduce
    total = forward + backward + reduce
    network = spanning + L * to_other_nodes if N > 1 else 0.0
    return ZeroPlusPlusEstimate(
        label=label or "+".join(options) or "none",
        forward_gather=round(forward),
        backward_gather=round(backward),
        reduce=round(reduce),
        node_local=round(local),
        node_network=round(network),
        secondary_bytes=b * (P - R) // L if "hpz" in options else 0,
        intra_seconds=total / (intra_gbps * 1e9 / 8) if L > 1 else None,
        inter_seconds=network / (inter_gbps * 1e9 / 8) if N > 1 else None,
    )


def zeropp_estimates(shape: ModelShape, **options) -> list[ZeroPlusPlusEstimate]:
    """`zeropp_estimate` for every row of `OPTION_SETS`."""
    return [zeropp_estimate(shape, chosen, label=label, **options) for label, chosen in OPTION_SETS.items()]
