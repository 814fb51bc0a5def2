"""Test-wide settings: no network, quiet transformers, one thread per process on small CI machines,
and Triton's interpreter for the kernel tests where there is no GPU (set before Triton is imported)."""

import os
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")

if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch


@pytest.fixture(scope="session")
def sharded(tmp_path_factory):
    """Per world size, the per-rank results of that world's matrix cases (one torchrun launch each,
    on first use; see `hf_zero.testing.matrix_cases`)."""
    from hf_zero.testing.cases import cases_to_json
    from hf_zero.testing.launch import torchrun
    from hf_zero.testing.matrix_cases import CASES_BY_WORLD

    cache: dict[int, list[dict]] = {}

    def results(world: int) -> list[dict]:
        if world not in cache:
            out = tmp_path_factory.mktemp(f"matrix{world}")
            (out / "cases.json").write_text(cases_to_json(CASES_BY_WORLD[world]))
            torchrun(
                "hf_zero.testing.engine_matrix", world, [str(out / "cases.json"), str(out)], timeout=1200
            )
            cache[world] = [torch.load(out / f"rank{rank}.pt") for rank in range(world)]
        return cache[world]

    return results
