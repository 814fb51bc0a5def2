"""Stage 3: gather each unit's parameters just before it runs and release them right after, in
forward and again in backward.

Hooks on each unit module: a forward pre-hook gathers the unit; a forward post-hook releases it
(in a forward with gradients it first hooks the unit's outputs, so that the unit is gathered again
before its backward runs). The unit's inputs pass through an identity autograd function whose
backward runs once their gradients are all computed, when the unit's backward is over (FSDP2's
post-backward); the unit is released at the next unit's backward, or at the end of the pass. None
of this holds a reference to the autograd graph. (torch's `register_multi_grad_hook`, used before,
keeps the tensors' graph nodes in a closure stored on those very nodes: a cycle through C++ that
Python's collector cannot see, so every forward's graph stayed alive, with its saved activations
where no backward freed them.) The root unit (final norm, tied embeddings and head, and weights
tied across units) stays gathered from the start of the model's forward to the end of the backward
pass, or of the forward when there is no gradient.

Collectives pair up across ranks by call order, and ranks whose data skip a unit (a branch, a
tower) must still take part in its gathers. So each pass walks one canonical order (unit
registration order in forward, its reverse in backward): a request for unit k first gathers, and
releases at once, the units before k that this pass has not gathered yet, and the end of the pass
does the same for the rest. A unit used again after the walk has passed it (a layer reused in one
forward, a recomputation under activation checkpointing) is gathered again on demand, which every
rank running the same code does alike. Gathers run on their own process group, so that their
order never interleaves with the reduce-scatters, whose timing follows each rank's backward.

Prefetch: once a pass has gathered the unit it needs, it issues the gathers of the next units in
its walk (asynchronously, while the unit computes) as long as the units gathered ahead of the walk
stay within `prefetch_bytes`. Issuing follows the walk, so every rank still issues the same
gathers in the same order. On a GPU the collectives run on the process group's own stream: a
gather issued before the unit's kernels are queued overlaps them, and waiting on it only orders
the compute stream after it, without blocking the host. With the shards in an NVMe swap file,
the file's reader is also asked to read ahead the shards of the units after the prefetched ones,
as many as the prefetch budget holds (at least one), so that the next batch's uploads find them
read (`reader`).

ZeRO++ (`zeropp.py`): with `quantized_weights`, a forward walk's gathers travel as int8; with
`hpz_partition_size`, the weights each gather brings are also kept, split over the node, and the
backward walk's gathers come from that copy, inside the node.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..config.zero_config import MIN_PREFETCH_BYTES
from ..core.distributed import Collectives
from ..core.flat_group import FlatParamGroup
from ..core.units import Unit
from .zeropp import AfterWait, ZeroPlusPlus


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


def _grad_tensors(values: Any) -> list[torch.Tensor]:
    leaves, _ = tree_flatten(values)
    return [leaf for leaf in leaves if isinstance(leaf, torch.Tensor) and leaf.requires_grad]


class _AfterInputGradients(torch.autograd.Function):
    """Identity on a unit's inputs; its backward runs once the gradients of all of them are
    computed (autograd runs a node when its last incoming gradient arrives), i.e. when the unit's
    backward use is over. The context holds the callback only, never a tensor."""

    @staticmethod
    def forward(ctx, done, *inputs: torch.Tensor):  # type: ignore[override]
        ctx.done = done
        return inputs

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):  # type: ignore[override]
        ctx.done()
        return (None, *grads)


def _call_when_input_grads_done(args: Any, kwargs: Any, done) -> tuple[Any, Any] | None:
    """(args, kwargs) with each tensor that requires grad routed through `_AfterInputGradients`;
    None when there is none."""
    leaves, spec = tree_flatten((args, kwargs))
    positions = [i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor) and x.requires_grad]
    if not positions:
        return None
    routed = _AfterInputGradients.apply(done, *(leaves[i] for i in positions))
    for i, tensor in zip(positions, routed, strict=True):
        leaves[i] = tensor
    return tree_unflatten(leaves, spec)


class _OncePerBackward:
    """Calls `fn` at the first of the gradient hooks it is registered as, once per backward pass
    (graph task). Keeps one task id, not one per pass."""

    def __init__(self, fn) -> None:
        self.fn = fn
        self.last_task = None

    def __call__(self, grad: torch.Tensor) -> None:
        task = torch._C._current_graph_task_id()
        if task != self.last_task:
            self.last_task = task
            self.fn()


class _Walk:
    """One pass over the units in canonical order: which were gathered, and how far the pass got."""

    def __init__(self, order: Sequence[int]) -> None:
        self.order = list(order)
        self.position = {unit: i for i, unit in enumerate(self.order)}
        self.cursor = 0
        self.issued = 0  # units order[:issued] have had their gathers issued in this pass
        self.used: set[int] = set()  # units this pass asked for

    def restart(self) -> None:
        self.cursor = self.issued = 0
        self.used.clear()

    def step(self) -> int:
        """Move past the next unit of the order and return it."""
        unit = self.order[self.cursor]
        self.cursor += 1
        self.issued = max(self.issued, self.cursor)
        return unit

    def ahead(self) -> list[int]:
        """Units whose gathers were issued ahead of the walk."""
        return self.order[self.cursor : self.issued]


class UnitGatherer:
    """Gathers and releases the units of a stage-3 engine; see the module docstring."""

    def __init__(
        self,
        units: Sequence[Unit],
        segments: Sequence[FlatParamGroup],
        comm: Collectives,
        prefetch_bytes: int | None = None,
        on_unit_end: Callable[[int], None] | None = None,
        reader: Any = None,
        zeropp: ZeroPlusPlus | None = None,
    ) -> None:
        self.units = list(units)
        # ZeRO++ (`zeropp.py`): forward gathers in int8 (qwZ), backward gathers from the node's
        # secondary copy (hpZ).
        self.quantized = zeropp.weight_gather if zeropp is not None else None
        self.secondary = zeropp.secondary if zeropp is not None else None
        # offload_params="nvme": the swap file's reader (`NvmeSwapper`), which reads the shards of the
        # unit after the prefetched ones ahead, while the units before it compute.
        self.reader = reader
        self.comm = comm
        self.segments: list[list[FlatParamGroup]] = [[] for _ in units]
        for segment in segments:
            self.segments[segment.unit].append(segment)
        self.unit_bytes = [
            sum(s.layout.numel * s.flat.element_size() for s in unit_segments)
            for unit_segments in self.segments
        ]
        self.in_flight: dict[int, list] = {}  # unit -> work handles of its gathers, not waited yet
        self.prefetched_units = 0
        self.warned_order = False
        layers = [unit.index for unit in units if not unit.is_root]
        self.forward_walk = _Walk(layers)
        # An embedding's backward needs no weights (its gradient is the output's gradient added up
        # by index): the backward walk passes it by, and its gradients are reduced when the pass
        # ends. Every other unit is gathered again for its backward.
        self.backward_walk = _Walk(
            [u for u in reversed(layers) if not isinstance(self.units[u].module, nn.Embedding)]
        )
        # None: one unit ahead, whatever its size (the largest unit a walk gathers ahead: not the
        # first of a pass, such as the input embedding), and at least MIN_PREFETCH_BYTES, so that
        # small units travel several to a collective.
        ahead = set(self.forward_walk.order[1:]) | set(self.backward_walk.order[1:])
        self.prefetch_bytes = (
            max(max((self.unit_bytes[u] for u in ahead), default=0), MIN_PREFETCH_BYTES)
            if prefetch_bytes is None
            else prefetch_bytes
        )
        self.open_backward = False  # a forward with gradients ran; its backward pass has not ended
        self.pinned: set[int] = set()  # units kept gathered by `gathered_parameters`
        # Backward uses of each unit under way. A unit's use ends (its inputs' gradients are ready)
        # just before the use before it in forward begins (from the hook on that same tensor, its
        # output): a unit applied twice in a row is needed again at once. So the unit the backward
        # walk is in (`open_unit`) stays gathered until the walk moves on to another unit (or the
        # pass ends), which also ends its backward: `on_unit_end` (the stage-3 reducer) is told then.
        self.holds = [0] * len(self.units)
        self.open_unit: int | None = None
        self.on_unit_end = on_unit_end
        self.gathered_bytes = 0
        self.peak_gathered_bytes = 0

    # ---- gathering ------------------------------------------------------------------------------

    def issue(self, unit: int, use: str = "exact") -> None:
        """Start gathering unit `unit` (a no-op for segments already gathered or under way)."""
        self.issue_together([unit], use)

    def issue_together(self, units: Sequence[int], use: str = "exact") -> None:
        """Start gathering `units` in one all-gather (per dtype), whatever their param groups and
        buckets (segments already gathered or under way are left out).

        `use` says what for: "forward" (a forward walk's gather: int8 with qwZ, except the root
        unit, which stays gathered for the backward too), "backward" (from the node's secondary
        copy with hpZ, where it is fresh) or "exact" (the 16-bit weights, for the user's calls)."""
        todo = [(unit, [s for s in self.segments[unit] if not s.gathered]) for unit in units]
        todo = [(unit, segments) for unit, segments in todo if segments]
        if not todo:
            return
        segments = [segment for _, unit_segments in todo for segment in unit_segments]
        # (gives each segment its storage back; the pairs gather from the primary shards)
        pairs = [pair for segment in segments for pair in segment.gather()]
        secondary = self.secondary
        if use == "backward" and secondary is not None and secondary.holds(segments):
            works = secondary.all_gather(segments, todo[0][0])
        elif use == "forward" and self.quantized is not None and not self.units[todo[0][0]].is_root:
            fill = functools.partial(secondary.fill, segments) if secondary is not None else None
            works = self.quantized.all_gather_many(pairs, todo[0][0], then=fill)
        else:
            works = self.comm.all_gather_many(pairs, todo[0][0])
            if secondary is not None:
                works = [AfterWait(works, functools.partial(secondary.fill, segments))]
        for unit, unit_segments in todo:
            self.in_flight.setdefault(unit, []).extend(works)  # (waiting twice on a handle is free)
            self.gathered_bytes += sum(s.flat.numel() * s.flat.element_size() for s in unit_segments)
        self.peak_gathered_bytes = max(self.peak_gathered_bytes, self.gathered_bytes)

    def gather(self, unit: int, use: str = "exact") -> None:
        """Make unit `unit`'s parameters whole (a no-op if they are); `use` as in `issue_together`."""
        self.issue(unit, use)
        for work in self.in_flight.pop(unit, []):
            work.wait()

    def release(self, unit: int) -> None:
        """Drop unit `unit`'s gathered parameters (a no-op if they are not gathered or pinned)."""
        if unit in self.pinned:
            return
        for work in self.in_flight.pop(unit, []):  # never free storage a collective still writes
            work.wait()
        for segment in self.segments[unit]:
            if segment.gathered:
                self.gathered_bytes -= segment.flat.numel() * segment.flat.element_size()
                segment.release()

    def weights_changed(self) -> None:
        """The shards changed (a step, a write-back): hpZ's secondary copy serves no backward gather
        until forward gathers refill it."""
        if self.secondary is not None:
            self.secondary.stale()

    def release_all(self) -> None:
        for unit in self.units:
            self.release(unit.index)

    def _gather_in_order(self, walk: _Walk, unit: int, backward: bool = False) -> None:
        """Gather `unit` for a use in this pass, taking the walk through the units before it."""
        if walk.position[unit] < walk.cursor:  # the walk has passed it: gather it again, on demand
            if unit not in walk.used and not self.warned_order:
                self.warned_order = True
                warnings.warn(
                    f"hf_zero stage 3: unit {self.units[unit].name!r} ran after units registered later "
                    "than it; units are gathered (and prefetched) in registration order, so it was "
                    "gathered twice in this pass. Results are unaffected; communication grows. Register "
                    "the model's layers in the order they run, or name coarser units in "
                    "ZeroConfig.unit_classes.",
                    stacklevel=3,
                )
            walk.used.add(unit)
            self.gather(unit, "backward" if backward else "forward")
            self._prefetch(walk)
            return
        walk.used.add(unit)
        self._walk_through(walk, walk.position[unit], backward)

    def _walk_through(self, walk: _Walk, last: int, backward: bool, reduce: bool = True) -> None:
        """Take the walk through position `last`. Each unit it passes is gathered, with the
        prefetches that follow it, whether or not this rank's data use it (those that do not are
        released again: in forward at once, in backward when the walk leaves them), so every rank
        issues the same collectives in the same interleaving (`rules_of_order.py`). In backward the
        walk first ends the unit it is in (`_end_open_unit`)."""
        while walk.cursor <= last:
            if backward:
                self._end_open_unit(reduce)
            unit = walk.step()
            self.gather(unit, "backward" if backward else "forward")
            self._prefetch(walk)
            if backward:
                self.open_unit = unit
            elif walk.cursor <= last:  # skipped by this rank's data
                self.release(unit)

    def _end_open_unit(self, reduce: bool = True) -> None:
        """The backward walk leaves the unit it is in: its backward is over (`on_unit_end`), and it
        is released unless a use is still under way."""
        unit, self.open_unit = self.open_unit, None
        if unit is None:
            return
        if reduce and self.on_unit_end is not None:
            self.on_unit_end(unit)
        if not self.holds[unit]:
            self.release(unit)

    def _prefetch(self, walk: _Walk) -> None:
        """Issue the gathers of the walk's next units, within the prefetch budget. The budget is
        refilled once half of it is free, in one collective: units smaller than half the budget
        travel several at a time (a budget of one unit keeps one unit ahead, as before)."""
        ahead = sum(self.unit_bytes[u] for u in walk.ahead())
        if 2 * ahead > self.prefetch_bytes:
            self._read_ahead(walk)
            return
        batch = []
        while walk.issued < len(walk.order):
            upcoming = walk.order[walk.issued]
            if ahead + self.unit_bytes[upcoming] > self.prefetch_bytes:
                break
            batch.append(upcoming)
            ahead += self.unit_bytes[upcoming]
            walk.issued += 1
        self.prefetched_units += len(batch)
        self.issue_together(batch, "backward" if walk is self.backward_walk else "forward")
        self._read_ahead(walk)

    def _read_ahead(self, walk: _Walk) -> None:
        """Have the reader start on the shards of the units the walk will prefetch next: the next
        one, and those after it within the prefetch budget (a batch may issue several at once,
        and each read ahead spares the training thread a disk read)."""
        if self.reader is None:
            return
        upcoming = walk.order[walk.issued :]
        within = 0
        for index, unit in enumerate(upcoming):
            within += self.unit_bytes[unit]
            if index and within > self.prefetch_bytes:
                break
            for segment in self.segments[unit]:
                self.reader.read_ahead(segment)

    def _restart(self, walk: _Walk) -> None:
        """A pass begins: what the last one read ahead and did not use is dropped first (the
        weights may have changed since)."""
        if self.reader is not None:
            self.reader.forget_read_ahead()
        walk.restart()

    # ---- hooks ----------------------------------------------------------------------------------

    def install(self, model: nn.Module) -> list:
        """Register the hooks on the model (the root unit) and every other unit; returns the handles."""
        handles = [
            model.register_forward_pre_hook(self._root_pre_forward),
            model.register_forward_hook(self._root_post_forward),
        ]
        for unit in self.units:
            if not unit.is_root:
                handles.append(
                    unit.module.register_forward_pre_hook(self._pre_forward(unit.index), with_kwargs=True)
                )
                handles.append(unit.module.register_forward_hook(self._post_forward(unit.index)))
        return handles

    @torch.compiler.disable
    def _root_pre_forward(self, module: nn.Module, args: Any) -> None:
        if _in_backward():
            return
        if self.open_backward:
            # The last forward's backward never came (the engine ends a pass that had gradients
            # before this hook runs): its walk still takes part in the gathers, reducing nothing.
            self.end_backward(reduce=False)
        self._restart(self.forward_walk)
        self.gather(0)

    @torch.compiler.disable
    def _root_post_forward(self, module: nn.Module, args: Any, output: Any) -> None:
        if _in_backward():
            return
        walk = self.forward_walk
        if walk.cursor < len(walk.order):  # units this rank's data skipped at the end
            self._walk_through(walk, len(walk.order) - 1, backward=False)
            self.release(walk.order[-1])
        if torch.is_grad_enabled():
            self.open_backward = True
            self._restart(self.backward_walk)
        else:
            self.release(0)

    def _pre_forward(self, unit: int):
        @torch.compiler.disable
        def hook(module: nn.Module, args: Any, kwargs: Any) -> tuple[Any, Any] | None:
            if _in_backward():
                # Recomputed under activation checkpointing: within a backward use already under way
                # (the hook on its output gathered it), or else (checkpointing wrapped the whole
                # call) a use of its own, done when its inputs have their gradients.
                if self.holds[unit]:
                    self.gather(unit, "backward")
                    return None
                self._acquire(unit)
            else:
                self._gather_in_order(self.forward_walk, unit)
            if torch.is_grad_enabled():
                return _call_when_input_grads_done(args, kwargs, lambda: self._drop(unit))
            return None

        return hook

    def _post_forward(self, unit: int):
        @torch.compiler.disable
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if _in_backward():
                return  # a recomputation: its backward follows at once
            outputs = _grad_tensors(output) if torch.is_grad_enabled() else []
            if outputs:
                acquire = _OncePerBackward(lambda: self._acquire(unit))
                for tensor in outputs:
                    tensor.register_hook(acquire)
            self.release(unit)

        return hook

    def _acquire(self, unit: int) -> None:
        """A backward use of `unit` begins: gather it, the walk ending the units before it (a unit
        the backward walk passes by needs nothing gathered)."""
        self.holds[unit] += 1
        if unit in self.backward_walk.position:
            self._gather_in_order(self.backward_walk, unit, backward=True)

    def _drop(self, unit: int) -> None:
        """A backward use of `unit` is done (its inputs have their gradients): release it if no use
        needs it any more and the walk has left it (else the walk releases it when it leaves)."""
        self.holds[unit] = max(0, self.holds[unit] - 1)
        if not self.holds[unit] and unit != self.open_unit:
            self.release(unit)

    def end_backward(self, reduce: bool = True) -> None:
        """After a backward pass: take the walk through the units this rank's backward never
        reached (gathering them, and with `reduce` ending their backward too, for the ranks that ran
        them), end the last one, then release everything. `reduce=False`: no backward ran (a forward
        with gradients whose backward never came), so no unit's gradients are reduced."""
        if not self.open_backward:
            return
        walk = self.backward_walk
        self._walk_through(walk, len(walk.order) - 1, backward=True, reduce=reduce)
        self._end_open_unit(reduce)
        self.holds = [0] * len(self.units)
        self.release_all()
        self.open_backward = False
