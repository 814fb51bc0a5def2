"""Process-group set-up and the collectives the engine uses, with a count of bytes sent.

A single process without an initialised process group is world size 1: every collective is then
a local copy (or nothing), so the same engine code runs under `python`, `torchrun` and
`accelerate launch`. An existing process group (or a sub-group, for hf_zero beside tensor or
pipeline parallelism) can be handed in; the engine then shards over that group only.

hf_zero refers to process groups weakly: torch's registry owns them, so `destroy_process_group()`
frees a group (and joins its gloo worker threads) at once, even while an engine is still alive;
an engine whose group was destroyed refuses to run collectives. See `hf_zero.engine.teardown` for why
the groups must end before the interpreter does.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import os
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .arena import merge_adjacent
from .watchdog import CollectiveWatch

# torch >= 2.12 renamed the single-tensor collectives; older releases only have the old names.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

# gloo's own reduce-scatter and all-gather are slow on large messages: on the project's CPU machine
# (2-4 ranks, 8-40 MiB) the reduce-scatter took 1.3-2.1x the time of an all-reduce of the same
# tensor, and the all-gather up to 3x that of one broadcast per rank (RESULTS.md, "gloo's large
# collectives rerouted").
# A coalesced batch of at least GLOO_REROUTE_BYTES bytes (its full-size side) takes another route
# on gloo: a reduce-scatter as point-to-point messages, each rank sending every other its chunk, an
# all-gather as a broadcast from each rank. A batch of many tensors below GLOO_MESSAGE_BYTES on
# average, which would cost a round trip per tensor and rank, goes whole instead: a reduce-scatter
# as one all-reduce of its input, an all-gather as gloo's own. Smaller batches stay gloo's own,
# which are as fast there. The byte counts and the trace still describe the collective asked for.
GLOO_REROUTE_BYTES = 4 * 2**20
GLOO_MESSAGE_BYTES = 2**20


def _restart_safe_env_rendezvous() -> None:
    """Let a worker that torchrun restarted (`--max-restarts`) join its process group.

    Under torchrun the workers' `env://` rendezvous uses the launcher's store, which outlives a
    restart with the keys of the attempt before in it: a restarted worker then reads its peers'
    old addresses and `init_process_group` fails (gloo: "connectFullMesh failed ... Connection
    refused"). This wraps torch's `env://` handler (on import of hf_zero, before the Trainer's
    arguments start the process group) so that a restarted attempt's keys get a prefix of their
    own. The first attempt, and processes not started by torchrun, are left as torch has them.
    """
    # (`torch.distributed.rendezvous` the attribute is the function; the module holds the handlers)
    rendezvous_module = importlib.import_module("torch.distributed.rendezvous")
    handlers = getattr(rendezvous_module, "_rendezvous_handlers", None)
    original = handlers.get("env") if isinstance(handlers, dict) else None
    if original is None or getattr(original, "hf_zero_restart_prefix", False):
        return

    def env_rendezvous(url: str, **kwargs):
        iterator = original(url, **kwargs)
        store, rank, world_size = next(iterator)
        attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
        if attempt > 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True):
            store = dist.PrefixStore(f"hf_zero/restart_{attempt}", store)
        yield store, rank, world_size
        yield from iterator  # a second rendezvous: torch's handler refuses it

    env_rendezvous.hf_zero_restart_prefix = True
    handlers["env"] = env_rendezvous


if dist.is_available():
    _restart_safe_env_rendezvous()


def free_device_memory(device: torch.device) -> int:
    """Bytes free on `device`: what the CUDA driver reports, or the host's available memory."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def live_group(ref: Callable[[], dist.ProcessGroup | None] | None) -> dist.ProcessGroup | None:
    """The process group `ref` (a weak reference) refers to (None for a world of one), or a clear
    error once it was destroyed (or its engine closed)."""
    if ref is None:
        return None
    group = ref()
    if group is None:
        raise RuntimeError(
            "this hf_zero engine was closed (engine.close(), or the interpreter exiting) or its process group "
            "destroyed (torch.distributed.destroy_process_group), so it can run no more collectives; save "
            "before that, or initialise the process group and the engine again"
        )
    return group


def _closed() -> None:
    """Stands in for the weak reference of a closed engine's group: dead."""


@dataclass(frozen=True)
class DistContext:
    """Where this process sits: its rank and world size in the group the engine shards over, and
    the device it computes on. The group is held weakly (see the module docstring)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    group_ref: weakref.ref | None

    @property
    def group(self) -> dist.ProcessGroup | None:
        """The process group (None in a world of one); raises once it was destroyed."""
        return live_group(self.group_ref)


def choose_device(
    cuda_available: bool,
    device_count: int,
    local_rank: int | None,
    model_device: torch.device | None,
) -> torch.device:
    """The device this rank computes on.

    A model already on the CPU stays there. Under a launcher (`local_rank` known) each rank takes
    GPU `LOCAL_RANK`, whatever device the model happens to be on (a script that moved every rank's
    model to `cuda:0` would otherwise put all ranks on one GPU). Without a launcher the model's own
    GPU is kept, or GPU 0.
    """
    if not cuda_available or (model_device is not None and model_device.type == "cpu"):
        return torch.device("cpu")
    if local_rank is not None:
        return torch.device("cuda", local_rank % device_count)
    if model_device is not None and model_device.type == "cuda" and model_device.index is not None:
        return model_device
    return torch.device("cuda", 0)


def setup_distributed(
    model_device: torch.device | None = None, process_group: dist.ProcessGroup | None = None
) -> DistContext:
    """Join (or start, under torchrun) the default process group and pick this rank's device.

    NCCL is used when CUDA is available and gloo otherwise. Without a launcher (no WORLD_SIZE
    in the environment) this process is a world of one and no process group is created. With
    `process_group`, the engine's ranks are that group's.
    """
    use_cuda = torch.cuda.is_available() and (model_device is None or model_device.type != "cpu")
    launched_rank = os.environ.get("LOCAL_RANK")
    local_rank = int(launched_rank) if launched_rank is not None else None
    if process_group is not None:
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("process_group was given but torch.distributed is not initialised")
        group = process_group
        rank, world_size = dist.get_rank(group), dist.get_world_size(group)
    else:
        if dist.is_available() and not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        if dist.is_available() and dist.is_initialized():
            rank, world_size, group = dist.get_rank(), dist.get_world_size(), dist.group.WORLD
        else:
            rank, world_size, group = 0, 1, None
    device = choose_device(use_cuda, torch.cuda.device_count() if use_cuda else 0, local_rank, model_device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return DistContext(
        rank=rank,
        world_size=world_size,
        local_rank=local_rank or 0,
        device=device,
        group_ref=weakref.ref(group) if group is not None else None,
    )


def second_group(ctx: DistContext) -> DistContext:
    """The same ranks in a process group of their own, for collectives whose order must not mix
    with those of the first group (only the group's ranks take part in creating it)."""
    if ctx.world_size == 1:
        return ctx
    ranks = dist.get_process_group_ranks(ctx.group)
    if len(ranks) == dist.get_world_size():
        # Every rank is here: a group made by all of them is named by a counter they all advance
        # alike. A locally synchronised group's name hashes in how many groups the rank belongs
        # to, which differs between ranks after sub-groups not all of them joined: they would
        # pick different names and wait for each other for ever.
        group = dist.new_group(ranks=ranks)
    else:
        group = dist.new_group(ranks=ranks, use_local_synchronization=True)
    return DistContext(
        rank=ctx.rank,
        world_size=ctx.world_size,
        local_rank=ctx.local_rank,
        device=ctx.device,
        group_ref=weakref.ref(group),
    )


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two contiguous tensors share memory."""
    a_end = a.data_ptr() + a.numel() * a.element_size()
    return a.data_ptr() < b.data_ptr() + b.numel() * b.element_size() and b.data_ptr() < a_end


class _Done:
    """Stands in for a finished collective's work handle."""

    def wait(self) -> bool:
        return True

    def is_completed(self) -> bool:
        return True


class _Then:
    """One collective made of several work handles: `wait` waits for them all, then runs `finish`
    (which puts the result where the caller expects it) once."""

    def __init__(self, works: list, finish: Callable[[], None] | None = None) -> None:
        self.works, self.finish = works, finish

    def wait(self) -> bool:
        for work in self.works:
            work.wait()
        if self.finish is not None:
            finish, self.finish = self.finish, None
            finish()
        return True

    def is_completed(self) -> bool:
        return self.finish is None and all(work.is_completed() for work in self.works)


class _Watched:
    """A collective's work handle whose `wait` the rank's `CollectiveWatch` sees."""

    def __init__(self, work, watch: CollectiveWatch, record: dict) -> None:
        self.work, self.watch, self.record = work, watch, record

    def wait(self) -> bool:
        with self.watch.wait(self.record):
            return self.work.wait()

    def is_completed(self) -> bool:
        return self.work.is_completed()


class Collectives:
    """The collectives of one process group, counting the bytes this rank sends.

    The count follows the ring algorithms NCCL and gloo use for large messages: a reduce-scatter
    or all-gather over n elements sends (W-1)/W of them, an all-reduce twice that. So one
    all-reduce of the gradients costs what a reduce-scatter plus an all-gather of them costs,
    which is the claim ZeRO stages 1 and 2 rest on. On gloo a large reduce-scatter or all-gather
    travels another way (`GLOO_REROUTE_BYTES`), but is counted and traced as what was asked for.

    With `fingerprint=True` every call is also folded into a running digest of (operation,
    element count, dtype); `check_fingerprint()` compares it across ranks, so collectives that
    paired up out of order are reported instead of silently mixing gradients.

    `trace`, when a list is set there (several communicators may share one), receives a
    `(operation, communicator name, bytes, unit)` tuple per collective, in the order this rank
    issued them: what the rules of order (`rules_of_order.py`) are checked against.

    `watch`, when set (the engine's `CollectiveWatch`, shared by its communicators), sees every
    collective issued and every wait for one, and ends a wait that outlasts its timeout with a
    report (`watchdog.py`).
    """

    def __init__(self, ctx: DistContext, fingerprint: bool = False, name: str = "main") -> None:
        self.world_size = ctx.world_size
        self.group_ref = ctx.group_ref
        self.name = name
        self.trace: list[tuple[str, str, int, int | None]] | None = None
        self.watch: CollectiveWatch | None = None
        self.bytes_sent = 0
        self._fingerprint = hashlib.blake2b(digest_size=8) if fingerprint else None
        self._calls = 0
        # Broadcasts name their source by global rank; rank 0 of a sub-group need not be global rank 0.
        self._global_ranks = (
            [dist.get_global_rank(ctx.group, r) for r in range(ctx.world_size)] if ctx.world_size > 1 else [0]
        )
        self._on_gloo = ctx.world_size > 1 and dist.get_backend(ctx.group) == "gloo"

    @property
    def group(self) -> dist.ProcessGroup | None:
        """The process group (None in a world of one); raises once it was destroyed."""
        return live_group(self.group_ref)

    def close(self) -> None:
        """Refuse every collective from now on (the engine was closed)."""
        if self.group_ref is not None:
            self.group_ref = _closed

    def _record(
        self, op: str, tensors: Sequence[torch.Tensor], factor: float, unit: int | None = None
    ) -> dict | None:
        """Count, trace and fingerprint one collective; its watch record (None without a watch)."""
        share = (self.world_size - 1) / self.world_size
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        self.bytes_sent += round(nbytes * factor * share)
        if self.trace is not None:
            self.trace.append((op, self.name, nbytes, unit))
        if self._fingerprint is not None:
            for tensor in tensors:
                self._fingerprint.update(f"{op}:{tensor.numel()}:{tensor.dtype};".encode())
            self._calls += 1
        return self._issue(op, unit)

    def _issue(self, op: str, unit: int | None = None) -> dict | None:
        return self.watch.issue(op, self.name, unit) if self.watch is not None else None

    def _waiting(self, record: dict | None):
        """A block during which this rank waits in the collective `record`."""
        return self.watch.wait(record) if record is not None else contextlib.nullcontext()

    def _watched(self, work, record: dict | None):
        return _Watched(work, self.watch, record) if record is not None else work

    def all_reduce(self, tensor: torch.Tensor, async_op: bool = False, op=dist.ReduceOp.SUM):
        """Reduce `tensor` over ranks (a sum unless `op` says otherwise), in place."""
        if self.world_size == 1:
            return _Done()
        record = self._record("all_reduce", [tensor], 2.0)
        if async_op:
            return self._watched(dist.all_reduce(tensor, op=op, group=self.group, async_op=True), record)
        with self._waiting(record):
            dist.all_reduce(tensor, op=op, group=self.group)
        return _Done()

    def reduce_scatter(
        self, output: torch.Tensor, input: torch.Tensor, async_op: bool = False, unit: int | None = None
    ):
        """Sum `input` over ranks and leave chunk `rank` of the sum in `output` (which may be that
        chunk of `input` itself); `unit` only labels the trace."""
        (work,) = self.reduce_scatter_many([(output, input)], unit)
        if not async_op:
            work.wait()
        return work

    def all_gather(
        self, output: torch.Tensor, input: torch.Tensor, async_op: bool = False, unit: int | None = None
    ):
        """Concatenate every rank's `input` into `output` (in place when `input` is this rank's
        chunk); `unit` only labels the trace."""
        (work,) = self.all_gather_many([(output, input)], unit)
        if not async_op:
            work.wait()
        return work

    def reduce_scatter_many(
        self, pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], unit: int | None = None
    ) -> list:
        """`reduce_scatter(output, input)` for each pair, as one collective per dtype; returns the
        work handles, not waited (one per collective). The inputs are scratch: what they hold
        afterwards is unspecified (on gloo a large batch of small tensors is summed in them, see
        `GLOO_REROUTE_BYTES`)."""
        return self._coalesced("reduce_scatter", _reduce_scatter_single, pairs, unit, inputs=True)

    def all_gather_many(
        self, pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], unit: int | None = None
    ) -> list:
        """`all_gather(output, input)` for each pair, as one collective per dtype; returns the work
        handles, not waited (one per collective)."""
        return self._coalesced("all_gather", _all_gather_single, pairs, unit, inputs=False)

    def _coalesced(self, op: str, function, pairs, unit: int | None, inputs: bool) -> list:
        """Issue `function(output, input)` for `pairs`, coalesced into one collective per dtype, in
        the order each dtype first appears (the same on every rank: the layouts are). One is what
        pairs up across ranks, what the trace records, and on NCCL one grouped launch; gloo too runs
        a coalesced batch as one exchange. Dtypes are never mixed in one batch: gloo's coalesced
        all-gather garbles a batch of mixed dtypes."""
        if self.world_size == 1:
            for output, input in pairs:
                if output.data_ptr() != input.data_ptr():
                    output.copy_(input)
            return [_Done()] if pairs else []
        by_dtype: dict[torch.dtype, list] = {}
        for output, input in pairs:
            by_dtype.setdefault(input.dtype, []).append((output, input))
        works = []
        for batch in by_dtype.values():
            # Bytes and trace follow the full-size side: the input of a reduce-scatter, the output
            # of an all-gather.
            record = self._record(op, [pair[1] if inputs else pair[0] for pair in batch], 1.0, unit)
            route = self._gloo_route(batch, inputs)
            if route is not None:
                works.append(self._watched(route(batch), record))
                continue
            if len(batch) == 1:
                works.append(self._watched(function(*batch[0], group=self.group, async_op=True), record))
                continue
            # No `device`: the fast path, which every backend here implements (NCCL and gloo).
            with dist._coalescing_manager(group=self.group, async_ops=True) as manager:
                for output, input in batch:
                    function(output, input, group=self.group)
            works.append(self._watched(manager, record))
        return works

    def _gloo_route(
        self, batch: Sequence[tuple[torch.Tensor, torch.Tensor]], inputs: bool
    ) -> Callable[[Sequence[tuple[torch.Tensor, torch.Tensor]]], _Then] | None:
        """The route `batch` takes instead of gloo's own collective (`GLOO_REROUTE_BYTES`), or None.
        Tensors below `GLOO_MESSAGE_BYTES` on average would cost a round trip per tensor and rank as
        messages or broadcasts: such a reduce-scatter goes as one all-reduce, such an all-gather stays
        gloo's coalesced one (32 stage-3 units of 0.26 MB gathered by broadcasts took 2.4x DDP's step,
        not 1.8x)."""
        full = sum(pair[1 if inputs else 0].numel() * pair[0].element_size() for pair in batch)
        if not self._on_gloo or full < GLOO_REROUTE_BYTES:
            return None
        many_small = full < GLOO_MESSAGE_BYTES * len(batch)
        if not inputs:
            return None if many_small else self._all_gather_by_broadcasts
        return self._reduce_scatter_by_all_reduce if many_small else self._reduce_scatter_by_exchange

    def _reduce_scatter_by_all_reduce(self, batch: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> _Then:
        """gloo: sum the inputs in place over ranks and copy this rank's chunk of each to its output
        when waited. Inputs that sit end to end (stage 1's buckets) go as one tensor: gloo's
        coalesced all-reduce copies its inputs into one and back, and took several times as long."""
        rank = dist.get_rank(self.group)
        spans = [row[0] for row in merge_adjacent([(input,) for _, input in batch])]
        if len(spans) == 1:
            works = [dist.all_reduce(spans[0], group=self.group, async_op=True)]
        else:
            with dist._coalescing_manager(group=self.group, async_ops=True) as manager:
                for span in spans:
                    dist.all_reduce(span, group=self.group)
            works = [manager]

        def finish() -> None:
            for output, input in batch:
                chunk = input[rank * output.numel() : (rank + 1) * output.numel()]
                if output.data_ptr() != chunk.data_ptr():
                    output.copy_(chunk)

        return _Then(works, finish)

    def _reduce_scatter_by_exchange(self, batch: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> _Then:
        """gloo: send every other rank its chunk of each input and receive this rank's chunk of
        theirs; when waited, sum the chunks in rank order. Each rank sends (W-1)/W of its inputs
        once, as a ring reduce-scatter does and half of what an all-reduce sends: 1.4-1.6x faster
        than the all-reduce route at 8-40 MiB on 2-3 ranks (RESULTS.md). On two ranks the peer's
        chunk lands in the output itself (one addition, whose order does not change the bits),
        unless the output lies inside the input (stage 1 reduces each bucket in place); otherwise
        the chunks land in scratch."""
        me, world = dist.get_rank(self.group), self.world_size
        works, sums = [], []
        for output, input in batch:
            n = output.numel()
            inside = _overlap(output, input)
            landed = {}
            scratch = iter(()) if (world == 2 and not inside) else iter(input.new_empty((world - 1, n)))
            for step in range(1, world):
                to, source = (me + step) % world, (me - step) % world
                landed[source] = next(scratch, output)
                works.append(
                    dist.isend(input[to * n : (to + 1) * n], self._global_ranks[to], group=self.group)
                )
                works.append(dist.irecv(landed[source], self._global_ranks[source], group=self.group))
            landed[me] = input[me * n : (me + 1) * n]
            sums.append((output, [landed[rank] for rank in range(world)]))

        def finish() -> None:
            for output, chunks in sums:
                # An output that is one of the later chunks (stage 1 in place, rank 2 on) would be
                # overwritten before it is added: sum in the first chunk's scratch, then copy.
                total = chunks[0] if any(_overlap(output, chunk) for chunk in chunks[2:]) else output
                torch.add(chunks[0], chunks[1], out=total)
                for chunk in chunks[2:]:
                    total.add_(chunk)
                if total is not output:
                    output.copy_(total)

        return _Then(works, finish)

    def _all_gather_by_broadcasts(self, batch: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> _Then:
        """gloo: each rank broadcasts its chunk of every output in turn, straight into the others'
        outputs (rank order, the same on every rank)."""
        rank = dist.get_rank(self.group)
        for output, input in batch:
            own = output[rank * input.numel() : (rank + 1) * input.numel()]
            if own.data_ptr() != input.data_ptr():
                own.copy_(input)
        works = [
            dist.broadcast(
                output[source * input.numel() : (source + 1) * input.numel()],
                src=self._global_ranks[source],
                group=self.group,
                async_op=True,
            )
            for source in range(self.world_size)
            for output, input in batch
        ]
        return _Then(works)

    def all_to_all(
        self,
        output: torch.Tensor,
        input: torch.Tensor,
        output_counts: Sequence[int],
        input_counts: Sequence[int],
        total_elements: int,
    ) -> None:
        """Send `input_counts[r]` elements of `input` (in rank order) to rank r and receive
        `output_counts[r]` from each into `output`, waiting for the exchange. The ranks move
        different amounts; `total_elements`, the same on every rank, is what the trace and the
        fingerprint record."""
        if self.world_size == 1:
            output.copy_(input)
            return
        self.bytes_sent += (input.numel() - input_counts[dist.get_rank(self.group)]) * input.element_size()
        nbytes = total_elements * input.element_size()
        if self.trace is not None:
            self.trace.append(("all_to_all", self.name, nbytes, None))
        if self._fingerprint is not None:
            self._fingerprint.update(f"all_to_all:{total_elements}:{input.dtype};".encode())
            self._calls += 1
        with self._waiting(self._issue("all_to_all")):
            dist.all_to_all_single(output, input, list(output_counts), list(input_counts), group=self.group)

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> None:
        """Copy the tensor of the group's rank `src` to every rank."""
        if self.world_size == 1:
            return
        self.bytes_sent += tensor.numel() * tensor.element_size()
        if self.trace is not None:
            self.trace.append(("broadcast", self.name, tensor.numel() * tensor.element_size(), None))
        source = self._global_ranks[src]
        with self._waiting(self._issue("broadcast")):
            dist.broadcast(tensor, src=source, group=self.group)

    def broadcast_object(self, value: object) -> object:
        """The group's rank 0's `value` (any picklable object), on every rank."""
        if self.world_size == 1:
            return value
        holder = [value]
        with self._waiting(self._issue("broadcast_object")):
            dist.broadcast_object_list(holder, src=self._global_ranks[0], group=self.group)
        return holder[0]

    def all_gather_object(self, value: object) -> list:
        """Every rank's `value` (any picklable object), in rank order, on every rank."""
        if self.world_size == 1:
            return [value]
        everyone: list = [None] * self.world_size
        with self._waiting(self._issue("all_gather_object")):
            dist.all_gather_object(everyone, value, group=self.group)
        return everyone

    def barrier(self) -> None:
        """Wait until every rank of the group gets here."""
        if self.world_size > 1:
            with self._waiting(self._issue("barrier")):
                dist.barrier(group=self.group)

    def check_fingerprint(self) -> None:
        """Raise if the ranks issued different collectives since the last check (debug mode only)."""
        if self._fingerprint is None or self.world_size == 1:
            return
        mine = (self._fingerprint.hexdigest(), self._calls)
        everyone: list = [None] * self.world_size
        with self._waiting(self._issue("check_fingerprint")):
            dist.all_gather_object(everyone, mine, group=self.group)
        self._fingerprint = hashlib.blake2b(digest_size=8)
        self._calls = 0
        if any(other != everyone[0] for other in everyone):
            calls = [other[1] for other in everyone]
            raise RuntimeError(
                "hf_zero debug_collectives: the ranks issued different sequences of collectives in this "
                f"step (collectives per rank: {calls}); their reductions paired up wrongly. This is a bug "
                "in hf_zero or ranks running different models/configs: please report it with your config"
            )
