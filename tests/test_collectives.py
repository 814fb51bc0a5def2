"""gloo's large reduce-scatters and all-gathers take faster routes (point-to-point messages or
one all-reduce; one broadcast per rank) with the same results: the collectives alone, exactly, on
3 ranks and on a sub-group, and training at stages 1-3 with every collective on each route against
none (`hf_zero.testing.collective_checks`)."""

from __future__ import annotations

import json

import pytest

from hf_zero.testing.launch import torchrun


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("collectives") / "out.json"
    torchrun("hf_zero.testing.collective_checks", 3, [str(out)], timeout=600)
    return json.loads(out.read_text())


@pytest.mark.parametrize("check", ["collectives", "stage1", "stage2", "stage3"])
def test_rerouted_collectives_give_gloos_results(results, check):
    assert results[check] == [], results[check]
