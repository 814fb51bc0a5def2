"""The rules of order (`hf_zero/engine/rules_of_order.py`): every rank issues the same collectives in the
same interleaving across communicators, on models whose ranks take different paths (a branch in
the last layer only one rank takes, experts that get no tokens on one rank, units one rank skips),
at stages 2 and 3, with `overlap_comm` on and off and, at stage 3, prefetching on and off
(`hf_zero.testing.order_checks`, 2 gloo ranks)."""

from __future__ import annotations

import json

from hf_zero.engine.rules_of_order import first_difference
from hf_zero.testing.launch import torchrun
from hf_zero.testing.order_checks import CASES


def test_first_difference_names_the_first_collective_that_does_not_pair_up():
    same = [("all_gather", "gather", 8, 1), ("reduce_scatter", "main", 8, 1)]
    assert first_difference([same, list(same)]) is None
    assert first_difference([same, [same[0], ("reduce_scatter", "main", 8, 2)]]) is None  # units only label
    swapped = [same[1], same[0]]
    assert first_difference([same, swapped]) == (
        "collective 0: rank 0 issues all_gather of 8 bytes of unit 1 on the gather communicator where "
        "rank 1 issues reduce_scatter of 8 bytes of unit 1 on the main communicator"
    )
    assert first_difference([same, same[:1]]) == "rank 0 issues 2 collectives, rank 1 1"


def test_ranks_on_different_paths_issue_the_same_collectives_in_the_same_interleaving(tmp_path):
    out = tmp_path / "order.json"
    torchrun("hf_zero.testing.order_checks", 2, [str(out)], timeout=300)
    results = json.loads(out.read_text())
    assert set(results) == set(CASES)
    for name, result in results.items():
        assert result["difference"] is None, f"{name}: {result['difference']}"
        trace = result["traces"][0]
        communicators = {communicator for _, communicator, _, _ in trace}
        expected = {"main", "gather"} if "stage3" in name else {"main"}
        if "zeropp" in name:  # gradients reduce in the node's int8 all-to-all; backward gathers there too
            expected = {"gather", "hpz", "qgz_intra"} if "stage3" in name else {"main", "qgz_intra"}
        assert communicators == expected, name
        if "zeropp" in name:
            assert not any(op == "reduce_scatter" for op, _, _, _ in trace), name
            continue
        # At stage 3, 3 steps reduce every unit's gradients: 6 blocks and the root, at least once
        # each; at stage 2 the segments span the units (all labelled with the root's).
        reduced = {unit for op, _, _, unit in trace if op == "reduce_scatter"}
        assert reduced == (set(range(7)) if "stage3" in name else {0}), name
        # Muon: two all-to-alls per step (its pieces to the owners and back), in the step only.
        assert sum(op == "all_to_all" for op, _, _, _ in trace) == (6 if "muon" in name else 0), name
