"""The rules of order: what keeps every rank's collectives paired up, whatever its data did.

Collectives pair up by call order on each communicator, and on NCCL every collective first waits
for the stream that issues it. hf_zero has two communicators at stage 3 (the engine's, for
gradient reduce-scatters and step collectives, and one of its own for parameter all-gathers) and
keeps to three rules:

1. Every rank issues the same collectives in the same order on each communicator, whatever its
   data did: units in one canonical order (their registration order in forward, its reverse in
   backward); a parameter that got no gradient on this rank is reduced as zeros, at the same point
   in that order, not later; a unit this rank's data skipped is gathered (and at stage 3 reduced)
   where the order passes it.
2. A unit's gradient reduction (stage 3) is launched when that unit's backward ends, i.e. when the
   backward walk moves on from it (`gather.UnitGatherer`: the next unit's backward begins, or the
   pass ends), never at a point that depends on when other buckets filled. At stage 2 buckets are
   launched in one canonical order that all ranks agree on (`grad_sync.BackwardReduceScatter`).
3. Nothing waits, mid-pass, on a collective of one communicator while a collective of the other
   may still be queued behind it on some rank. Rules 1 and 2 give every rank the same interleaving
   of the two communicators' collectives, so a wait on a collective issued earlier never waits
   for one a peer issues later.

`ZeroEngine.trace_collectives()` records what a rank issues, as `(operation, communicator, bytes,
unit)`; `first_difference` compares the records of all ranks (tests/test_rules_of_order.py runs
models whose ranks take different paths: a branch in the last layer, experts without tokens,
skipped units).
"""

from __future__ import annotations

from collections.abc import Sequence

Record = Sequence  # (operation, communicator, bytes, unit)


def first_difference(traces: Sequence[Sequence[Record]]) -> str | None:
    """Where the ranks' traces (one per rank, in rank order) first disagree, in words; None when all
    ranks issued the same collectives in the same interleaving. Units are not compared (a label
    for the reader): only what pairs up, the operation, its communicator and its size."""
    reference = traces[0]
    for rank, trace in enumerate(traces[1:], start=1):
        for index, (mine, theirs) in enumerate(zip(reference, trace, strict=False)):
            if tuple(mine[:3]) != tuple(theirs[:3]):
                return (
                    f"collective {index}: rank 0 issues {_describe(mine)} where rank {rank} issues "
                    f"{_describe(theirs)}"
                )
        if len(trace) != len(reference):
            return f"rank 0 issues {len(reference)} collectives, rank {rank} {len(trace)}"
    return None


def _describe(record: Record) -> str:
    operation, communicator, size, unit = record
    where = "" if unit is None else f" of unit {unit}"
    return f"{operation} of {size} bytes{where} on the {communicator} communicator"
