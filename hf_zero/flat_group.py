"""One optimizer param group as flat buffers: the 16-bit compute buffer every rank holds in full,
and the fp32 master weights and gradients of the slice this rank owns."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .distributed import Collectives
from .layout import FlatLayout


class FlatParamGroup:
    """The parameters of one param group, re-homed into a flat buffer.

    After construction each parameter's `.data` is a view into `flat` (so the model computes on
    it unchanged), `master` holds fp32 master weights for this rank's shard (initialised from the
    parameters' original values, before any cast to 16 bits), and `grad_shard` accumulates the
    averaged fp32 gradient of that shard. `flat_grad`, a full-size buffer in the compute dtype,
    exists only for stages that keep whole gradients until the step (0 and 1).
    """

    def __init__(
        self,
        params: Sequence[nn.Parameter],
        layout: FlatLayout,
        rank: int,
        compute_dtype: torch.dtype,
        device: torch.device,
        keep_full_grads: bool,
    ) -> None:
        self.params = list(params)
        self.original_dtypes = [p.dtype for p in params]
        self.layout = layout
        unsharded = layout.num_shards == 1
        # Unsharded (stage 0), every rank holds the one and only "shard": shard rank 0.
        self.rank = 0 if unsharded else rank
        self.compute_dtype = compute_dtype
        alias_master = unsharded and compute_dtype == torch.float32
        self.master_is_flat = alias_master

        if not alias_master:
            master = layout.shard_of([p.data for p in params], self.rank, torch.float32, device)
        self.flat = torch.zeros(layout.numel, dtype=compute_dtype, device=device)
        for index, param in enumerate(params):
            view = layout.param_view(self.flat, index)
            view.copy_(param.data)
            param.data = view
        # fp32 and unsharded: the compute buffer already is the master copy.
        self.master = nn.Parameter(self.flat if alias_master else master)

        self.flat_grad = (
            torch.zeros(layout.numel, dtype=compute_dtype, device=device) if keep_full_grads else None
        )
        if self.flat_grad is not None and unsharded and compute_dtype == torch.float32:
            self.grad_shard = self.flat_grad
        else:
            self.grad_shard = torch.zeros(layout.shard_numel, dtype=torch.float32, device=device)

        self._spans_by_slot: list[list] = [[] for _ in self.params]
        for span in layout.spans(self.rank):
            self._spans_by_slot[span.slot].append(span)

        # Where the updated master goes in the compute dtype: nowhere when the master is the
        # compute buffer, straight into it when unsharded, else into a shard-sized buffer that
        # the all-gather reads from.
        if alias_master:
            self.master_out: torch.Tensor | None = None
        elif unsharded:
            self.master_out = self.flat
        else:
            self.master_out = torch.empty(layout.shard_numel, dtype=compute_dtype, device=device)

    @property
    def accumulator(self) -> torch.Tensor:
        """The buffer the gradient hooks add into (full-size for stages 0/1, the shard for stage 2)."""
        return self.flat_grad if self.flat_grad is not None else self.grad_shard

    def clear_grads(self) -> None:
        """Forget all accumulated gradients (the shard of stages 0/1 is overwritten at each reduce)."""
        self.accumulator.zero_()

    def set_master_values(self, index: int, value: torch.Tensor) -> None:
        """Overwrite this rank's master elements of slot `index` with the matching ones of `value`."""
        if self.master_is_flat:
            return  # the model's own copy already is the master
        source = value.detach().reshape(-1)
        with torch.no_grad():
            for span in self._spans_by_slot[index]:
                self.master.data[span.shard_begin : span.shard_begin + span.length].copy_(
                    source[span.param_begin : span.param_begin + span.length]
                )

    def round_master(self) -> None:
        """Write the master shard, in the compute dtype, to where `publish` reads it."""
        if self.master_out is not None:
            self.master_out.copy_(self.master.data)

    def publish(self, comm: Collectives) -> list:
        """All-gather every rank's updated 16-bit chunks into the compute buffer.

        Returns the collectives' work handles; the caller waits on them.
        """
        if self.layout.num_shards == 1:
            return []
        return [
            comm.all_gather(
                self.layout.bucket_view(self.flat, bucket),
                self.layout.shard_chunk(self.master_out, bucket),
                async_op=True,
            )
            for bucket in self.layout.buckets
        ]

    def gather_master(self, comm: Collectives, keep: bool = True) -> list[torch.Tensor]:
        """Every parameter's full fp32 master value as CPU tensors (one per slot).

        Every rank must call it; a rank with `keep=False` only takes part in the all-gathers
        (one bucket at a time, on the device) and gets an empty list, so only the ranks that keep
        the result hold a host copy of the model.
        """
        if self.layout.num_shards == 1:
            if not keep:
                return []
            master = self.master.data
            return [self.layout.param_view(master, i).to("cpu", copy=True) for i in range(len(self.params))]
        full: list[torch.Tensor] = []
        for bucket in self.layout.buckets:
            gathered = torch.empty(bucket.size, dtype=torch.float32, device=self.master.device)
            comm.all_gather(gathered, self.layout.shard_chunk(self.master.data, bucket))
            if keep:
                for index in bucket.slots:
                    slot = self.layout.slots[index]
                    begin = slot.offset - bucket.start
                    full.append(gathered[begin : begin + slot.numel].view(slot.shape).to("cpu", copy=True))
        return full
