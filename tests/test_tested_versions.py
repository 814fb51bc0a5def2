"""`hf-zero env` warns for a package outside the versions CI tested, and that table
(`hf_zero.cli.tested_versions.TESTED`) agrees with pyproject.toml and the files CI installs from."""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

import pytest

from hf_zero.cli import main
from hf_zero.cli.tested_versions import TESTED

ROOT = Path(__file__).resolve().parents[1]


def _fake_versions(monkeypatch: pytest.MonkeyPatch, fake: dict[str, str | None]) -> None:
    """Make importlib.metadata report these versions (None: not installed), the real ones otherwise."""
    real = importlib.metadata.version

    def version(name: str) -> str:
        if name not in fake:
            return real(name)
        if fake[name] is None:
            raise importlib.metadata.PackageNotFoundError(name)
        return fake[name]

    monkeypatch.setattr(importlib.metadata, "version", version)


def _warnings(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("warning:")]


def test_env_warns_once_for_each_package_outside_the_tested_range(monkeypatch, capsys):
    oldest, newest = TESTED["transformers"]
    _fake_versions(
        monkeypatch,
        {
            **{package: TESTED[package][1] for package in TESTED},
            "transformers": "4.57.1",
            "accelerate": "99.0.0",
            "peft": None,
            "torch": f"{TESTED['torch'][1]}+cu128",  # a local build tag: the same release
            "kernels": "not-a-version",
        },
    )
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert "transformers 4.57.1\n" in out and "peft         not installed\n" in out
    assert _warnings(out) == [
        f"warning: transformers 4.57.1 is older than any version CI tested (CI tested {oldest} to {newest})",
        f"warning: accelerate 99.0.0 is newer than any version CI tested (CI tested "
        f"{TESTED['accelerate'][0]} to {TESTED['accelerate'][1]})",
        "warning: kernels not-a-version is not a version number hf_zero can compare (CI tested "
        f"{TESTED['kernels'][0]} to {TESTED['kernels'][1]})",
    ]
    assert main(["env", "--strict"]) == 1
    capsys.readouterr()


def test_env_is_quiet_and_strict_passes_at_both_ends_of_the_range(monkeypatch, capsys):
    for end in (0, 1):
        _fake_versions(monkeypatch, {package: TESTED[package][end] for package in TESTED})
        assert main(["env", "--strict"]) == 0
        out = capsys.readouterr().out
        assert not _warnings(out)
        assert f"transformers {TESTED['transformers'][end]}\n" in out


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.strip().lower()] = version.strip()
    return pins


def _lower_bounds() -> dict[str, str]:
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = [
        *project["dependencies"],
        *(r for extra in project["optional-dependencies"].values() for r in extra),
    ]
    bounds = {}
    for requirement in requirements:
        match = re.match(r"([A-Za-z0-9_.-]+)\s*>=\s*([0-9.]+)", requirement)
        if match:
            bounds[match.group(1).lower()] = match.group(2)
    return bounds


def _same(a: str, b: str) -> bool:
    from packaging.version import Version

    return Version(a) == Version(b)


def test_the_tested_ranges_are_what_the_ci_legs_install():
    """The minimum leg installs pyproject.toml's lower bounds, which are TESTED's oldest versions;
    the pinned leg's versions lie inside TESTED."""
    from packaging.version import Version

    minimum = _pins(ROOT / ".ci" / "constraints-minimum.txt")
    bounds = _lower_bounds()
    assert {"transformers", "accelerate", "peft"} <= minimum.keys()
    for package, version in minimum.items():
        if package == "torch":
            continue  # every leg runs the CPU build on CI's disk (TESTED["torch"])
        assert _same(version, bounds[package]), f"{package}: pyproject.toml says >={bounds[package]}"
        assert _same(version, TESTED[package][0]), f"{package}: TESTED says {TESTED[package][0]}"
    pinned = _pins(ROOT / ".ci" / "constraints.txt")
    for package, (oldest, newest) in TESTED.items():
        assert package in pinned, f"{package} is in TESTED but .ci/constraints.txt does not pin it"
        assert Version(oldest) <= Version(pinned[package]) <= Version(newest), (
            f"{package}: .ci/constraints.txt pins {pinned[package]}, outside TESTED's {oldest} to {newest}"
        )
