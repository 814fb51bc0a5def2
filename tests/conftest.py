"""Test-wide settings: no network, quiet transformers, one thread per process on small CI machines,
and Triton's interpreter for the kernel tests where there is no GPU (set before Triton is imported).

The single-process tests that run on any device take it from the `device` fixture: `--device cuda`
(or HF_ZERO_TEST_DEVICE=cuda) runs them on the GPU, as benchmarks/gpu_proof.sh does; the default
is the CPU, where CI runs."""

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


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--device",
        default=os.environ.get("HF_ZERO_TEST_DEVICE", "cpu"),
        choices=["cpu", "cuda"],
        help="where the single-process, device-agnostic tests compute (default cpu, or HF_ZERO_TEST_DEVICE)",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "on_device: a single-process test that computes on the `device` fixture"
    )


# Under `-n 2 --dist loadfile` (the README's command) the two workers take whole files in
# collection order: the files that take longest (measured with --durations) go first, so that the
# quick ones even the workers out at the end. Files not named keep their order, after these. Order
# only: every file runs either way. test_engine_hardening, which reads the matrix launches
# test_engine_multirank makes (the `sharded` fixture), stays late, so it finds them done.
LONGEST_FIRST = (
    "test_engine_multirank.py",
    "test_recipes_cli.py",
    "test_trainer.py",
    "test_elastic.py",
    "test_multinode.py",
    "test_zeropp.py",
    "test_fp16.py",
    "test_checkpoint_resume.py",
    "test_from_pretrained.py",
    "test_gpu_proof.py",
    "test_op_counts.py",
    "test_accelerator.py",
    "test_hangs.py",
    "test_memory_growth.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # `-m on_device` selects exactly the tests `--device cuda` moves (benchmarks/gpu_proof.sh).
    for item in items:
        if "device" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.on_device)
    rank = {name: index for index, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FIRST)))  # stable


@pytest.fixture(scope="session")
def device(request: pytest.FixtureRequest) -> torch.device:
    """The device the single-process tests compute on (`--device`)."""
    name = request.config.getoption("--device")
    if name not in ("cpu", "cuda"):  # HF_ZERO_TEST_DEVICE bypasses the option's choices
        raise pytest.UsageError(f"--device / HF_ZERO_TEST_DEVICE must be cpu or cuda, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        # A GPU run that quietly fell back to the CPU would prove nothing: refuse it.
        pytest.fail("--device cuda was asked for but torch sees no GPU", pytrace=False)
    return torch.device(name)


@pytest.fixture
def needs_triton(device: torch.device) -> None:
    """Skip a kernel test where its Triton kernel cannot run: on the CPU outside the interpreter."""
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton kernels need --device cuda or Triton's interpreter (TRITON_INTERPRET=1)")


@pytest.fixture(scope="session")
def sharded(tmp_path_factory):
    """Per world size, the per-rank results of that world's matrix cases (one torchrun launch each,
    on first use; see `hf_zero.testing.matrix_cases`). Under pytest-xdist the workers share one
    launch per world size: the first to need it runs it, the others wait for its files."""
    from filelock import FileLock

    from hf_zero.testing.cases import cases_to_json
    from hf_zero.testing.launch import torchrun
    from hf_zero.testing.matrix_cases import CASES_BY_WORLD

    # The folder every worker of this session sees (each worker's own base folder sits inside it).
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    cache: dict[int, list[dict]] = {}

    def results(world: int) -> list[dict]:
        if world not in cache:
            out = shared / f"matrix{world}"
            with FileLock(str(shared / f"matrix{world}.lock")):
                if not (out / "done").exists():
                    out.mkdir(exist_ok=True)
                    (out / "cases.json").write_text(cases_to_json(CASES_BY_WORLD[world]))
                    torchrun(
                        "hf_zero.testing.engine_matrix",
                        world,
                        [str(out / "cases.json"), str(out)],
                        timeout=1200,
                    )
                    (out / "done").touch()
            cache[world] = [torch.load(out / f"rank{rank}.pt") for rank in range(world)]
        return cache[world]

    return results
