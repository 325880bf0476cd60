"""What `pip install gemmtune[...]` brings: every feature's imports are declared, and the `test`
extra (what CI installs into its fresh venv) holds every optional feature, so CI exercises them."""

from __future__ import annotations

import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def _names(reqs: list[str]) -> set[str]:
    return {Requirement(r).name.lower() for r in reqs}


def test_gp_sampler_dependency_is_core() -> None:
    """`--sampler gp` is advertised beside tpe: Optuna's GPSampler needs scipy (and torch)."""
    core = _names(tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"])
    assert {"scipy", "torch", "optuna"} <= core
    installed = [Requirement(r) for r in metadata.requires("gemmtune") or []]
    assert any(r.name == "scipy" and r.marker is None for r in installed)


def test_test_extra_holds_every_optional_feature() -> None:
    extras = tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"]
    assert _names(extras["plot"]) == {"matplotlib"}
    assert _names(extras["plot"]) | _names(extras["postgres"]) <= _names(extras["test"])
