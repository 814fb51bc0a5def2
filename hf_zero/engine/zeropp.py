"""ZeRO++: less traffic between nodes, three options, each off by default (`ZeroConfig`).

- qwZ (`quantized_weights="int8"`, stage 3): `QuantizedAllGather` sends a forward all-gather as
  block-wise int8 (one fp32 scale per `quantization_block` elements of a rank's chunk), quantized
  from the rank's 16-bit shard and dequantized into the gathered buffer (`kernels/quantize.py`):
  1 byte per element plus 4 per block instead of 2.
- hpZ (`hpz_partition_size=L`, stage 3): `SecondaryPartition` keeps a second copy of the layer
  units' 16-bit weights split among the L ranks of a node (1/L each). Each forward gather fills
  it from the weights it gathered, at no extra traffic; the backward gathers then run inside the
  node. (With qwZ as well, backward thus computes on the weights the forward's int8 gather gave,
  as in DeepSpeed.) It is marked stale after every step and every `gathered_parameters` block, and
  a backward gather whose units it does not hold fresh falls back to the full gather: alike on
  every rank, because every rank issues the same gathers.
- qgZ (`quantized_gradients="int8"`, stages 2-3): `HierarchicalQuantizedReduceScatter` stands in
  for the reducer's reduce-scatters: an int8 all-to-all inside each node, which leaves each rank
  the node's sum (in fp32) of the chunks held at its place of every node, then an int8 all-to-all
  across nodes among the ranks at the same place, which leaves each rank the sum of its own chunk.

Every collective goes through `Collectives`, so bytes, traces, fingerprints and the watchdog see
them; `ZeroPlusPlus.comms` lists the node-local communicators beside the engine's two.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..config.zero_config import ZeroConfig
from ..core.distributed import Collectives, DistContext, _Done
from ..core.flat_group import FlatParamGroup
from ..core.topology import Topology, node_size_from, subgroups
from ..core.units import Unit
from ..kernels import dequantize_int8, quantize_int8


def _blocks(n: int, block: int) -> int:
    return -(-n // block)


class AfterWait:
    """Work handles that count as done once `finish` ran after all of them completed (once)."""

    def __init__(self, works: Sequence, finish: Callable[[], None]) -> None:
        self.works, self.finish, self.done = list(works), finish, False

    def wait(self) -> bool:
        if not self.done:
            for work in self.works:
                work.wait()
            self.done = True
            self.finish()
        return True

    def is_completed(self) -> bool:
        return self.done


class QuantizedAllGather:
    """qwZ: all-gathers whose inputs travel as block-wise int8 with fp32 scales."""

    def __init__(self, comm: Collectives, block: int) -> None:
        self.comm, self.block = comm, block

    def all_gather_many(
        self,
        pairs: Sequence[tuple[torch.Tensor, torch.Tensor]],
        unit: int | None = None,
        then: Callable[[], None] | None = None,
    ) -> list:
        """`Collectives.all_gather_many(pairs)`, quantized: one int8 and one fp32 (scales)
        collective; each output is filled (dequantized) when the returned handle is waited on,
        after which `then` runs."""
        world = self.comm.world_size
        sends, landings = [], []
        for output, chunk in pairs:
            length, blocks = chunk.numel(), _blocks(chunk.numel(), self.block)
            q, scales = quantize_int8(chunk.reshape(1, length), self.block)
            q_all = torch.empty(world * length, dtype=torch.int8, device=chunk.device)
            scales_all = torch.empty(world * blocks, dtype=torch.float32, device=chunk.device)
            sends.append(((q_all, q.reshape(-1)), (scales_all, scales.reshape(-1))))
            landings.append((output, q_all.view(world, length), scales_all.view(world, blocks)))
        works = self.comm.all_gather_many([s[0] for s in sends] + [s[1] for s in sends], unit)

        def finish() -> None:
            for output, q_all, scales_all in landings:
                dequantize_int8(q_all, scales_all, self.block, output.view(q_all.shape))
            landings.clear()
            if then is not None:
                then()

        return [AfterWait(works, finish)]


class SecondaryPartition:
    """hpZ: the layer units' 16-bit weights once more, each bucket split among the ranks of a node."""

    def __init__(self, segments: Sequence[FlatParamGroup], comm: Collectives, place: int) -> None:
        self.comm, self.place, self.size = comm, place, comm.world_size
        self.buffers: dict[int, torch.Tensor] = {}
        for segment in segments:
            numel = sum(bucket.size for bucket in segment.layout.buckets) // self.size
            self.buffers[id(segment)] = torch.zeros(
                numel, dtype=segment.compute_dtype, device=segment.flat.device
            )
        self.fresh: set[int] = set()

    @property
    def nbytes(self) -> int:
        """Bytes of the secondary copy on this rank."""
        return sum(buffer.numel() * buffer.element_size() for buffer in self.buffers.values())

    def _pieces(self, segment: FlatParamGroup) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(this rank's part of each bucket in `flat`, where it is kept)."""
        buffer, offset, pieces = self.buffers[id(segment)], 0, []
        for bucket in segment.layout.buckets:
            part = bucket.size // self.size
            start = bucket.start + self.place * part
            pieces.append((segment.flat[start : start + part], buffer[offset : offset + part]))
            offset += part
        return pieces

    def holds(self, segments: Sequence[FlatParamGroup]) -> bool:
        """Whether the copy is fresh for all of `segments` (and so can serve their gathers)."""
        return all(id(s) in self.buffers and id(s) in self.fresh for s in segments)

    def fill(self, segments: Sequence[FlatParamGroup]) -> None:
        """Keep this rank's part of the just-gathered `segments` (non-layer segments are ignored)."""
        for segment in segments:
            if id(segment) in self.buffers:
                for gathered, kept in self._pieces(segment):
                    kept.copy_(gathered)
                self.fresh.add(id(segment))

    def stale(self) -> None:
        """The weights changed (a step, a `gathered_parameters` block): refill before serving."""
        self.fresh.clear()

    def all_gather(self, segments: Sequence[FlatParamGroup], unit: int | None = None) -> list:
        """Gather `segments` (their storage already given back) from the node's copy."""
        pairs = [
            (segment.layout.bucket_view(segment.flat, bucket), kept)
            for segment in segments
            for bucket, (_, kept) in zip(segment.layout.buckets, self._pieces(segment), strict=True)
        ]
        return self.comm.all_gather_many(pairs, unit)


class HierarchicalQuantizedReduceScatter:
    """qgZ: `reduce_scatter_many` as two int8 all-to-alls, inside the node and then across nodes,
    each dequantized and summed in fp32. A rank's int8 values and their scales (as bytes) travel in
    one message per peer."""

    def __init__(self, topology: Topology, intra: Collectives, inter: Collectives, block: int) -> None:
        self.topology, self.intra, self.inter, self.block = topology, intra, inter, block

    def _exchange(self, comm: Collectives, rows: Sequence[torch.Tensor], peers: int) -> list[tuple]:
        """Quantize each fp32 [peers, r, n] tensor of `rows` (row block d goes to peer d), exchange,
        and return per tensor the received (q [peers, r, n], scales [peers, r, blocks])."""
        messages, shapes = [], []
        for x in rows:
            _, r, n = x.shape
            q, scales = quantize_int8(x.reshape(peers * r, n), self.block)
            messages.append((q.view(peers, r * n), scales.view(peers, -1).view(torch.int8)))
            shapes.append((r, n, scales.shape[1]))
        send = torch.cat([torch.cat([part[d] for msg in messages for part in msg]) for d in range(peers)])
        count = send.numel() // peers
        received = torch.empty_like(send)
        comm.all_to_all(received, send, [count] * peers, [count] * peers, send.numel())
        by_peer = received.view(peers, count)
        out, offset = [], 0
        for r, n, blocks in shapes:
            q = by_peer[:, offset : offset + r * n].contiguous().view(peers, r, n)
            offset += r * n
            scales = by_peer[:, offset : offset + r * blocks * 4].contiguous().view(torch.float32)
            offset += r * blocks * 4
            out.append((q, scales.view(peers, r, blocks)))
        return out

    def reduce_scatter_many(
        self, pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], unit: int | None = None
    ) -> list:
        """Sum each pair's input (`world × chunk` elements) over ranks and leave this rank's chunk of
        the sum in its output, as `Collectives.reduce_scatter_many` does; done on return."""
        if not pairs:
            return []
        nodes, size = self.topology.nodes, self.topology.node_size
        chunks = [output.numel() for output, _ in pairs]
        if size > 1:
            # Chunk m·size + d goes to the node's rank d: [size, nodes, chunk] per pair.
            rows = [
                staging.view(nodes, size, n).transpose(0, 1).float()
                for (_, staging), n in zip(pairs, chunks, strict=True)
            ]
            node_sums = []
            for (q, scales), n in zip(self._exchange(self.intra, rows, size), chunks, strict=True):
                node_sums.append(
                    dequantize_int8(q, scales, self.block, torch.empty(nodes, n, device=q.device))
                )
        else:
            node_sums = [
                staging.view(nodes, n).float() for (_, staging), n in zip(pairs, chunks, strict=True)
            ]
        if nodes > 1:
            rows = [partial.view(nodes, 1, n) for partial, n in zip(node_sums, chunks, strict=True)]
            for (output, _), (q, scales) in zip(pairs, self._exchange(self.inter, rows, nodes), strict=True):
                dequantize_int8(q, scales, self.block, output.view(1, -1))
        else:
            for (output, _), partial in zip(pairs, node_sums, strict=True):
                output.copy_(partial.view(-1))
        return [_Done()]


class ZeroPlusPlus:
    """The ZeRO++ parts an engine uses (None where an option is off) and their communicators."""

    def __init__(
        self, ctx: DistContext, config: ZeroConfig, gather_comm: Collectives | None, layer_segments
    ) -> None:
        self.topology = Topology(ctx.world_size, node_size_from(config.node_size, ctx.world_size), ctx.rank)
        self.comms: list[Collectives] = []
        fingerprint = config.debug_collectives
        self.weight_gather = (
            QuantizedAllGather(gather_comm, config.quantization_block)
            if config.quantized_weights == "int8" and gather_comm is not None
            else None
        )
        self.secondary: SecondaryPartition | None = None
        if config.hpz_partition_size > 1:
            size = config.hpz_partition_size
            if ctx.world_size % size:
                raise ValueError(
                    f"ZeroConfig.hpz_partition_size={size} does not divide the world size {ctx.world_size}; "
                    "set it to the ranks per node (a divisor of the world size), or 1 to turn hpZ off"
                )
            groups = [list(range(start, start + size)) for start in range(0, ctx.world_size, size)]
            comm = Collectives(subgroups(ctx, groups), fingerprint, name="hpz")
            self.comms.append(comm)
            self.secondary = SecondaryPartition(layer_segments, comm, ctx.rank % size)
        self.gradient_reduce: HierarchicalQuantizedReduceScatter | None = None
        if config.quantized_gradients == "int8":
            topology = self.topology
            intra = Collectives(
                subgroups(ctx, [topology.node_ranks(n) for n in range(topology.nodes)]),
                fingerprint,
                "qgz_intra",
            )
            inter = Collectives(
                subgroups(ctx, [topology.peer_ranks(p) for p in range(topology.node_size)]),
                fingerprint,
                "qgz_inter",
            )
            self.comms += [intra, inter]
            self.gradient_reduce = HierarchicalQuantizedReduceScatter(
                topology, intra, inter, config.quantization_block
            )

    @classmethod
    def build(
        cls,
        ctx: DistContext,
        config: ZeroConfig,
        communicators: list[Collectives],
        reducer: Any,
        segments: Sequence[FlatParamGroup],
        units: Sequence[Unit],
    ) -> ZeroPlusPlus | None:
        """The engine's ZeRO++ parts, or None with every option off (or in a world of one).
        `segments` are the engine's (frozen ones too), `units` its units. `communicators` (the
        engine's: main, and gather at stage 3) gains the new ones, which share
        the main one's watchdog; `reducer` reduce-scatters through qgZ where it is on."""
        wanted = (
            config.quantized_weights != "none"
            or config.quantized_gradients != "none"
            or config.hpz_partition_size > 1
        )
        if not wanted or ctx.world_size == 1:
            return None
        gather_comm = communicators[1] if len(communicators) > 1 else None
        layer_segments = [s for s in segments if not units[s.unit].is_root]
        parts = cls(ctx, config, gather_comm, layer_segments)
        for comm in parts.comms:
            comm.watch = communicators[0].watch
        communicators += parts.comms
        if parts.gradient_reduce is not None:
            reducer.scatter_comm = parts.gradient_reduce
        return parts
