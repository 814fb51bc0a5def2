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
        names: Sequence[str],
        params: Sequence[nn.Parameter],
        layout: FlatLayout,
        rank: int,
        compute_dtype: torch.dtype,
        device: torch.device,
        keep_full_grads: bool,
    ) -> None:
        self.names = list(names)
        self.params = list(params)
        self.original_dtypes = [p.dtype for p in params]
        self.layout = layout
        unsharded = layout.num_shards == 1
        # Unsharded (stage 0), every rank holds the one and only "shard": shard rank 0.
        self.rank = 0 if unsharded else rank
        self.compute_dtype = compute_dtype
        alias_master = unsharded and compute_dtype == torch.float32

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

    @property
    def master_is_flat(self) -> bool:
        return self.master.data_ptr() == self.flat.data_ptr()

    def clear_grads(self) -> None:
        """Forget all accumulated gradients."""
        self.grad_shard.zero_()
        if self.flat_grad is not None:
            self.flat_grad.zero_()

    def publish_master(self, comm: Collectives) -> list:
        """Copy this rank's updated master chunks into the compute buffer and all-gather every bucket.

        Returns the collectives' work handles; the caller waits on them.
        """
        if self.layout.num_shards == 1:
            if not self.master_is_flat:
                self.flat.copy_(self.master.data)
            return []
        works = []
        for bucket in self.layout.buckets:
            chunk = self.layout.chunk_view(self.flat, bucket, self.rank)
            chunk.copy_(self.layout.shard_chunk(self.master.data, bucket))
            works.append(comm.all_gather(self.layout.bucket_view(self.flat, bucket), chunk, async_op=True))
        return works

    def gather_master(self, comm: Collectives) -> list[torch.Tensor]:
        """Every parameter's full fp32 master value, on every rank, as CPU tensors (one per slot)."""
        if self.layout.num_shards == 1:
            master = self.master.data
            return [self.layout.param_view(master, i).to("cpu", copy=True) for i in range(len(self.params))]
        full: list[torch.Tensor | None] = [None] * len(self.params)
        for bucket in self.layout.buckets:
            gathered = torch.empty(bucket.size, dtype=torch.float32, device=self.master.device)
            comm.all_gather(gathered, self.layout.shard_chunk(self.master.data, bucket))
            for index in bucket.slots:
                slot = self.layout.slots[index]
                begin = slot.offset - bucket.start
                full[index] = gathered[begin : begin + slot.numel].view(slot.shape).to("cpu", copy=True)
        return full  # type: ignore[return-value]
