"""Nothing in the repository shadows an installed package for Python started in its root.

`python -c`, `python -m`, pytest, torchrun workers and notebooks put the current folder first on
`sys.path`, so a top-level folder of the checkout named like an installed package wins over it.
`kernels/` (installed as `hf_zero.kernels`) shares its name with the Hugging Face Hub package that
transformers imports; its `__init__.py` hands the name over (see kernels/README.md).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# What a user's script in the repository root does: transformers (whose hub_kernels imports the Hub
# `kernels` where transformers accepts the installed version), hf_zero and its kernels, `import kernels`.
PROBE = """
import json, sys
import transformers.integrations.hub_kernels
from transformers.utils.import_utils import is_kernels_available
import hf_zero, hf_zero.kernels
import kernels
print(json.dumps({
    "kernels_file": getattr(kernels, "__file__", None),
    "kernels_has_get_kernel": hasattr(kernels, "get_kernel"),
    "transformers_sees_kernels": is_kernels_available(),
    "hf_zero_kernels_file": hf_zero.kernels.__file__,
    "hf_zero_kernels_has_adam": hasattr(hf_zero.kernels, "adam_step"),
    "path0": sys.path[0],
}))
"""


def _probe(*python_args: str) -> dict:
    """Run Python with these arguments in the repository root and return what PROBE printed."""
    # Only the interpreter's own sys.path: no extra entries, and the current folder first.
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONSAFEPATH")}
    result = subprocess.run(
        [sys.executable, *python_args], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _installed_kernels_file() -> Path:
    try:
        distribution = importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.fail(
            "the Hub package `kernels` is not installed: it is in the `test` extra "
            '(pip install "torch==2.13.0" -e ".[test]")'
        )
    return Path(distribution.locate_file("kernels/__init__.py")).resolve()


def test_the_hub_kernels_package_wins_in_the_repository_root():
    installed = _installed_kernels_file()
    seen = _probe("-c", PROBE)
    assert seen["path0"] == ""  # the repository root, as `python -c` there gives it
    assert Path(seen["kernels_file"]).resolve() == installed
    assert seen["kernels_has_get_kernel"]
    assert Path(seen["hf_zero_kernels_file"]).resolve() != installed and seen["hf_zero_kernels_has_adam"]


def test_without_the_hub_package_kernels_is_an_empty_namespace(tmp_path):
    """An environment without the Hub package: the same site-packages, less `kernels` and its
    metadata (a folder of links, read with `python -S` + `site.addsitedir` so .pth files, the
    editable install of hf_zero among them, still apply)."""
    site_packages = Path(sysconfig.get_paths()["purelib"])
    view = tmp_path / "site-packages"
    view.mkdir()
    for entry in site_packages.iterdir():
        if entry.name == "kernels" or (
            entry.name.startswith("kernels-") and entry.name.endswith(".dist-info")
        ):
            continue
        (view / entry.name).symlink_to(entry)
    seen = _probe("-S", "-c", f"import site; site.addsitedir({str(view)!r})\nexec({PROBE!r})")
    assert seen["path0"] == ""
    # What Python gives for a folder without __init__.py: no file, so transformers reads the Hub
    # package as absent instead of importing hf_zero's kernels as it.
    assert seen["kernels_file"] is None and not seen["kernels_has_get_kernel"]
    assert seen["transformers_sees_kernels"] is False
    assert seen["hf_zero_kernels_has_adam"]


def test_no_other_top_level_module_is_named_like_an_installed_package():
    """A top-level folder with __init__.py (or a module file) in the repository root shadows a
    package of the same name for Python started there; only `kernels/` may, and it hands the
    name over (the tests above)."""
    installed = importlib.metadata.packages_distributions()
    ours = {"hf_zero", "kernels"}
    shadowing = {}
    for entry in ROOT.iterdir():
        name = entry.stem if entry.suffix == ".py" else entry.name
        importable = (entry.is_dir() and (entry / "__init__.py").is_file()) or entry.suffix == ".py"
        if importable and name not in ours:
            owners = set(installed.get(name, ())) | (
                {"the standard library"} if name in sys.stdlib_module_names else set()
            )
            if owners:
                shadowing[name] = sorted(owners)
    assert not shadowing, (
        f"top-level modules of the repository have the names of installed packages {shadowing}, which they "
        "shadow for Python started in the repository root: rename them (pyproject.toml can still install "
        "a folder under hf_zero, as it does kernels/ and model_cards/)"
    )
