"""The tables `hf-zero estimate` prints: memory per GPU and host for each stage and offload choice,
and the communication per step (with ZeRO++'s options too, on several nodes)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from ...config.zero_config import ZeroConfig
from ...core.owners import balance_owners, newton_schulz_cost, owner_spread
from .formulas import OFFLOAD_LABELS, PRECISION_BYTES, Estimate, ModelShape
from .zeropp import zeropp_estimates


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
    muon = getattr(options, "optimizer", "adamw") == "muon"
    weights_name, weights_size = _unit_for(shape.parameters * b)
    lines = [
        f"{shape.name}: {shape.parameters:,} parameters ({shape.parameters * b / weights_size:.2f} {weights_name} in "
        f"{options.precision}); root unit {shape.root_parameters:,} (final norm, tied weights), "
        f"{units} unit(s) of up to {shape.largest_unit:,} (layers, untied input embedding and head)",
        f"{options.nodes} node(s) x {options.gpus} GPU(s) = {world} rank(s); {options.precision}; "
        f"{'Muon + AdamW' if muon else 'AdamW'}; "
        f"micro-batch {options.batch} x {options.seq} tokens per GPU, {options.grad_accum} per step"
        + ("; activation checkpointing" if options.checkpointing else ""),
    ]
    if muon:
        lines.append(_muon_line(shape, world))
    lines.append("")
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
    lines.append(_snapshot_line(shape, world, muon))
    lines.append("")

    per_stage = {e.stage: e.comm for e in estimates}  # offload moves no collective
    comm_name, comm_size = _unit_for(max(c.total_bytes for c in per_stage.values()))
    inter = f", inter-node {options.inter_gbps:g} Gb/s per node" if options.nodes > 1 else ""
    lines.append(
        f"Communication per GPU per optimizer step in {comm_name} (intra-node {options.intra_gbps:g} Gb/s "
        f"per GPU{inter})"
    )
    header = ["stage", "collectives", "reduce", "gather", *(["muon a2a"] if muon else []), "total"]
    header += ["intra-node", "inter-node", "time"]
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
            *([f"{c.exchange_bytes / comm_size:.2f}"] if muon else []),
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
    if options.nodes > 1:
        lines += ["", *_zeropp_lines(shape, options)]
    return "\n".join(lines)


def _zeropp_lines(shape: ModelShape, options: argparse.Namespace) -> list[str]:
    """Stage 3's communication with each ZeRO++ option (`zeropp.py`), for more than one node."""
    rows = zeropp_estimates(
        shape,
        gpus=options.gpus,
        nodes=options.nodes,
        precision=options.precision,
        grad_accum=options.grad_accum,
        intra_gbps=options.intra_gbps,
        inter_gbps=options.inter_gbps,
    )
    name, size = _unit_for(max(max(row.total_bytes, row.node_network) for row in rows))
    header = ["ZeRO++", "fwd gather", "bwd gather", "reduce", "total/GPU", "in node", "node network"]
    header += ["hpZ copy/GPU", "intra-node", "inter-node", "time"]
    table = [
        [
            row.label,
            *(f"{value / size:.2f}" for value in (row.forward_gather, row.backward_gather, row.reduce)),
            *(f"{value / size:.2f}" for value in (row.total_bytes, row.node_local, row.node_network)),
            f"{row.secondary_bytes / size:.2f}",
            _seconds(row.intra_seconds),
            _seconds(row.inter_seconds),
            _seconds(row.seconds),
        ]
        for row in rows
    ]
    return [
        f"Stage 3 with ZeRO++ (ZeroConfig quantized_weights, hpz_partition_size={options.gpus}, "
        f"quantized_gradients; int8 blocks of {ZeroConfig.quantization_block}), per optimizer step in {name}:",
        *_table(header, table),
        "in node: sent only inside the node (hpZ's backward gathers, qgZ's first all-to-all); node network: "
        "what each node's network carries",
    ]


def _muon_line(shape: ModelShape, world: int) -> str:
    """What Muon takes and how evenly its owners share the Newton–Schulz work."""
    costs = [newton_schulz_cost(s) for s in shape.muon_shapes]
    spread = owner_spread(costs, balance_owners(costs, world), world) if costs else 1.0
    return (
        f"Muon: {len(costs)} hidden matrices, {shape.muon_parameters:,} parameters (one fp32 momentum each, "
        f"sharded); Newton-Schulz work of the most loaded of {world} rank(s) {spread:.3f}x the mean"
    )


def _snapshot_line(shape: ModelShape, world: int, muon: bool = False) -> str:
    """The host memory of `async_checkpoints`: each rank's part of the checkpoint (fp32 master and
    AdamW's two moments, 12 bytes per parameter it owns; Muon's matrices 8), held from the first save on."""
    whole = 12 * shape.parameters - (4 * shape.muon_parameters if muon else 0)
    name, size = _unit_for(whole)
    return (
        f"async_checkpoints: the host also holds each rank's checkpoint part, {whole / world / size:.2f} {name} "
        f"per GPU at stages 1-3 ({whole / size:.2f} {name} on rank 0 at stage 0)"
    )
