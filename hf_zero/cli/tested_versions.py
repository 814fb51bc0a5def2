"""The versions of hf_zero's dependencies that CI runs the tests with, and a warning for each
installed one outside them (`hf-zero env`).

CI's legs (.ci/run) keep TESTED true: the minimum leg installs pyproject.toml's lower bounds
(.ci/constraints-minimum.txt), the pinned leg .ci/constraints.txt and the newest leg what pip
resolves. The pinned and minimum legs end with `hf-zero env --strict`, which fails while a version
they ran lies outside TESTED; the newest leg prints a warning line for a release newer than TESTED
(raise the newest version here once that leg has passed with it).
tests/test_tested_versions.py holds pyproject.toml and both constraint files to this table.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Mapping

from packaging.version import InvalidVersion, Version

# Distribution name: (oldest, newest) version that some CI leg ran the tests with.
TESTED: dict[str, tuple[str, str]] = {
    "torch": ("2.13.0", "2.13.0"),
    "transformers": ("5.23.0", "5.25.0"),
    "accelerate": ("1.10.0", "1.16.0"),
    "peft": ("0.20.0", "0.21.2"),
    "datasets": ("5.2.0", "5.2.0"),
    "safetensors": ("0.8.0", "0.8.0"),
    "tokenizers": ("0.23.3", "0.23.3"),
    "triton": ("3.9.0", "3.9.0"),
    "liger-kernel": ("0.8.5", "0.8.5"),
    "kernels": ("0.18.3", "0.19.1"),
}


def installed_versions() -> dict[str, str | None]:
    """The installed version of each package in TESTED, None for those not installed."""
    versions: dict[str, str | None] = {}
    for package in TESTED:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def untested_warnings(versions: Mapping[str, str | None]) -> list[str]:
    """One line for each installed package whose version lies outside the range CI tested."""
    lines = []
    for package, version in versions.items():
        if version is None or package not in TESTED:
            continue
        oldest, newest = TESTED[package]
        tested = f"CI tested {oldest}" if oldest == newest else f"CI tested {oldest} to {newest}"
        try:
            # A local build tag (torch's +cpu, +cu128) is the same release as far as the tests go.
            public = Version(Version(version).public)
        except InvalidVersion:
            lines.append(
                f"warning: {package} {version} is not a version number hf_zero can compare ({tested})"
            )
            continue
        if public < Version(oldest):
            lines.append(f"warning: {package} {version} is older than any version CI tested ({tested})")
        elif public > Version(newest):
            lines.append(f"warning: {package} {version} is newer than any version CI tested ({tested})")
    return lines
