"""The dependency floors keep the promises the code makes: weights are read with
torch.load(weights_only=True), which torch < 2.6 lets a crafted file bypass (CVE-2025-32434); a Ray
cluster can only be given token authentication from Ray 2.52."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def floors() -> dict[str, tuple[int, ...]]:
    extras = tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"]
    found: dict[str, tuple[int, ...]] = {}
    for requirements in extras.values():
        for requirement in requirements:
            match = re.fullmatch(r"([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?>=([0-9.]+)", requirement)
            if match:
                name, version = match.group(1).lower(), tuple(int(p) for p in match.group(2).split("."))
                found[name] = min(found.get(name, version), version)  # the loosest floor of any extra
    return found


def test_torch_floor_closes_the_weights_only_bypass():
    assert floors()["torch"] >= (2, 6)


def test_ray_floor_has_token_authentication():
    assert floors()["ray"] >= (2, 52)
