"""One optimizer param group as flat buffers: the 16-bit compute buffer every rank holds in full,
and the fp32 master weights of the slice this rank owns. Gradients live in `grad_sync`."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from .arena import nbytes
from .device import DeviceOps
from .distributed import Collectives
from .host_placement import HostPlacement
from .layout import FlatLayout, Run
from .params import assign


class FlatParamGroup(HostPlacement):
    """A segment: the parameters of one unit (see `units.py`) in one optimizer param group that
    compute in one dtype, re-homed into a flat buffer (parameters of modules the model keeps in
    fp32 get segments of their own).

    After construction each parameter's `.data` is a view into `flat` (so the model computes on
    it unchanged) and `master` holds fp32 master weights for this rank's shard, initialised from
    the parameters' original values (before any cast to 16 bits). The optimizer updates the
    master and writes its rounded value straight into this rank's chunks of `flat` (`runs` pairs
    the two), from where `publish` all-gathers it in place: no shard-sized 16-bit copy is kept.

    With `sharded_params` (stage 3) the rank keeps only its 16-bit chunk (`shard16`, where the
    optimizer writes its update); `flat` is a buffer whose storage exists only while the segment is
    gathered (`gather`) and is released again (`release`), as FSDP2 does, so the parameters stay the
    same objects, views of it. A frozen segment (`trainable=False`) has no master.

    `read(slot, begin, length)`, given at stage 3 only, supplies the values of the shard's elements
    instead of the parameters' `.data`: a pretrained model's weights still on disk, which each rank
    thus reads only in part (see `pending.py`).

    `into` gives the master shard and the 16-bit shard zeroed views to live in (views carved from
    one allocation for many segments, see `arena.py`); None: each is allocated here. The same
    tensor for both (fp32 at stage 3, nothing offloaded) makes the shard its own master.

    With `offload="cpu"` (`offload_optimizer="cpu"`) the master lives in host memory (page-locked where
    there is a GPU), and so does the optimizer state made from it; the group also keeps two host
    buffers for the step: the shard's gradient in fp32 (`host_grad`) and the updated weights in
    the compute dtype (`host_copy`), from where they go back to the device, allocated only where
    the step needs the whole shard at once (`ensure_host_buffers`; otherwise it streams through
    `host_staging.py`). With `offload="nvme"` the engine moves the master into a swap file and the
    step lends both buffers (see `nvme.py`).
    """

    def __init__(
        self,
        params: Sequence[nn.Parameter],
        layout: FlatLayout,
        rank: int,
        compute_dtype: torch.dtype,
        ops: DeviceOps,
        optimizer_group: int | None = 0,
        unit: int = 0,
        sharded_params: bool = False,
        read: Callable[[int, int, int], torch.Tensor] | None = None,
        offload: str = "none",
        offload_params: str = "none",
        into: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None),
    ) -> None:
        self.params = list(params)
        self.ops = ops
        device = ops.device
        self.optimizer_group = optimizer_group
        self.unit = unit
        self.original_dtypes = [p.dtype for p in params]
        self.layout = layout
        unsharded = layout.num_shards == 1
        # Unsharded (stage 0), every rank holds the one and only "shard": shard rank 0.
        self.rank = 0 if unsharded else rank
        self.compute_dtype = compute_dtype
        self.sharded_params = sharded_params
        self.trainable = optimizer_group is not None
        # "cpu": master and host buffers in host memory; "nvme": master too, until `nvme.py` moves
        # it into a swap file, and host buffers lent by the step.
        self.offload = offload if self.trainable else "none"
        # fp32 and unsharded: the compute buffer already is the master copy.
        self.master_is_flat = (
            unsharded and compute_dtype == torch.float32 and not sharded_params and not self.offloaded
        )
        # fp32 at stage 3: the engine may give the same tensor as master and shard (`into`).
        self.master_is_shard = self.trainable and into[0] is not None and into[0] is into[1]
        host = torch.device("cpu")
        if offload_params != "none" and not sharded_params:
            raise ValueError("FlatParamGroup offloads parameter shards only at stage 3 (sharded_params)")
        # "cpu": the 16-bit shard in host memory; "nvme": too, until `nvme.py` maps it to a swap file.
        self.offload_params = offload_params
        self._uploaded: torch.Tensor | None = None  # the host shard's device copy while gathered
        # NVMe: brings the shard from the file to the device without synchronising (`nvme.py`).
        self.upload: Callable[[], torch.Tensor] | None = None

        if read is None:
            values = [p.data for p in params]

            def read(slot: int, begin: int, length: int) -> torch.Tensor:
                return values[slot].detach().reshape(-1)[begin : begin + length]

        elif not sharded_params:
            raise ValueError("FlatParamGroup reads values in shards only at stage 3 (sharded_params)")
        # One pass over the values gives the fp32 master shard and, at stage 3, the 16-bit one.
        with_master = self.trainable and not self.master_is_flat
        dtypes = [torch.float32] * with_master + [compute_dtype] * sharded_params
        devices = [host if self.offloaded else device] * with_master + [
            host if self.params_offloaded else device
        ] * sharded_params
        # CPU offload keeps the shards in host buffers that copies leave asynchronously (NVMe's
        # move into the swap file's maps instead); an arena given in `into` was made that way.
        pinned = [self.offload == "cpu"] * with_master + [offload_params == "cpu"] * sharded_params
        given = [into[0]] * with_master + [into[1]] * sharded_params
        given = [
            ops.host_zeros(layout.shard_numel, dtype) if pin and out is None else out
            for dtype, pin, out in zip(dtypes, pinned, given, strict=True)
        ]
        shards = layout.shards_of(read, self.rank, dtypes, devices, given)
        master = shards[0] if with_master else None
        self.shard16 = shards[-1] if sharded_params else None
        self.flat = torch.zeros(layout.numel, dtype=compute_dtype, device=device)
        for index, param in enumerate(params):
            view = layout.param_view(self.flat, index)
            if not sharded_params:
                view.copy_(param.data)
            assign(param, view)
        self.gathered = not sharded_params
        if sharded_params:
            self.release()
        self.master = nn.Parameter(self.flat if self.master_is_flat else master) if self.trainable else None
        self.runs: list[Run] = layout.runs(self.rank)
        self.spans_by_slot: list[list] = [[] for _ in self.params]
        for span in layout.spans(self.rank):
            self.spans_by_slot[span.slot].append(span)
        self.host_grad = self.host_copy = None

    def master_run(self, run: Run) -> torch.Tensor:
        return self.master.data[run.shard_start : run.shard_start + run.length]

    def flat_run(self, run: Run) -> torch.Tensor | None:
        """Where the updated weights of `run` go in the compute dtype (None: the master is the flat
        buffer): this rank's chunk of `flat`, or of `shard16` at stage 3."""
        if self.master_is_flat or self.master_is_shard:
            return None
        if self.sharded_params:
            return self.shard16[run.shard_start : run.shard_start + run.length]
        return self.flat[run.flat_start : run.flat_start + run.length]

    def gather(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Stage 3: give `flat` its storage back; returns the (output, input) pairs of the
        all-gathers that fill it, which the caller issues (a unit's segments together) and waits
        on before the parameters are used."""
        self.flat.untyped_storage().resize_(self.layout.numel * self.flat.element_size())
        self.gathered = True
        source = self.shard16
        if self.params_offloaded:
            # The shard lives on the host (page-locked on a GPU) or in a swap file: one asynchronous
            # upload, which the collectives queue behind.
            source = self._uploaded = (
                self.upload() if self.upload is not None else source.to(self.flat.device, non_blocking=True)
            )
        return [
            (self.layout.bucket_view(self.flat, bucket), self.layout.shard_chunk(source, bucket))
            for bucket in self.layout.buckets
        ]

    def release(self) -> None:
        """Stage 3: drop the gathered parameters' storage (the parameters keep their shapes)."""
        self.flat.untyped_storage().resize_(0)
        self.gathered = False
        self._uploaded = None

    def round_master(self) -> None:
        """Write the master shard, in the compute dtype, into this rank's chunks of `flat`."""
        for run in self.runs:
            out = self.flat_run(run)
            if out is not None:
                out.copy_(self.master_run(run))

    def set_master_values(self, index: int, value: torch.Tensor) -> None:
        """Overwrite this rank's elements of slot `index` (master and, at stage 3, the 16-bit shard)
        with the matching ones of `value`."""
        source = value.detach().reshape(-1)
        targets = [t for t in (None if self.master_is_flat else self.master, self.shard16) if t is not None]
        if self.master_is_shard:
            targets = targets[:1]
        with torch.no_grad():
            for target in targets:
                for span in self.spans_by_slot[index]:
                    target.data[span.shard_begin : span.shard_begin + span.length].copy_(
                        source[span.param_begin : span.param_begin + span.length]
                    )

    def moved_parameter(self) -> int | None:
        """The first parameter that is no longer a view of `flat` in the compute dtype, if any (a
        `model.to(...)` or `.half()` after `initialize` gives parameters storage of their own, which
        the engine never updates)."""
        storage = self.flat.untyped_storage().data_ptr()
        for index, p in enumerate(self.params):
            if (
                p.dtype != self.compute_dtype
                or p.device != self.flat.device
                or p.untyped_storage().data_ptr() != storage
            ):
                return index
        return None

    def publish(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The (output, input) pairs of the all-gathers that spread every rank's updated chunks of
        `flat` in place (none when unsharded, or at stage 3, which gathers on use instead); the
        caller issues them, every segment's together, and waits."""
        if self.layout.num_shards == 1 or self.sharded_params:
            return []
        return [
            (
                self.layout.bucket_view(self.flat, bucket),
                self.flat[bucket.chunk_start(self.rank) : bucket.chunk_start(self.rank) + bucket.chunk],
            )
            for bucket in self.layout.buckets
        ]

    def gather_master(self, comm: Collectives, keep: bool = True) -> list[torch.Tensor]:
        """Every parameter's full value as CPU tensors (one per slot): the fp32 master, or for a
        frozen stage-3 segment its 16-bit value.

        Every rank must call it; a rank with `keep=False` only takes part in the all-gathers
        (one bucket at a time, on the device) and gets an empty list, so only the ranks that keep
        the result hold a host copy of the model.
        """
        source = self.master.data if self.trainable else self.shard16
        if self.layout.num_shards == 1:
            if not keep:
                return []
            return [self.layout.param_view(source, i).to("cpu", copy=True) for i in range(len(self.params))]
        full: list[torch.Tensor] = []
        for bucket in self.layout.buckets:
            # Offloaded masters live on the host: the collective runs on the device (NCCL needs it).
            gathered = torch.empty(bucket.size, dtype=source.dtype, device=self.flat.device)
            comm.all_gather(gathered, self.layout.shard_chunk(source, bucket).to(self.flat.device))
            if keep:
                for index in bucket.slots:
                    slot = self.layout.slots[index]
                    begin = slot.offset - bucket.start
                    full.append(gathered[begin : begin + slot.numel].view(slot.shape).to("cpu", copy=True))
        return full

    def state_bytes(self) -> dict[str, int]:
        """Bytes of the persistent tensors this group allocated: the 16-bit weights (at stage 3 this
        rank's shard of them; gathered units come and go), the masters, and with offload the host
        buffers (masters counted there instead)."""
        master = (
            0 if self.master_is_flat or self.master_is_shard or self.master is None else nbytes(self.master)
        )
        # (`flat` at stage 3 has storage only while gathered; the shards may be views of an arena)
        weights = nbytes(self.shard16) if self.sharded_params else self.flat.untyped_storage().nbytes()
        on_host = 0
        if self.params_offloaded:  # the 16-bit shard is on the host with the rest, or in a swap file
            on_host += weights if self.offload_params == "cpu" else 0
            weights = 0
        if self.offload == "cpu":
            buffers = [t for t in (self.host_grad, self.host_copy) if t is not None]
            on_host += master + sum(nbytes(t) for t in buffers)
        if self.offloaded:  # (with NVMe the master is in the swap file: see `ZeroEngine.memory_breakdown`)
            master = 0
        return {"weights": weights, "masters": master, "offloaded": on_host}
