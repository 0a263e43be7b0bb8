"""pyproject.toml declares version ranges; requirements*.txt pin the exact set CI installs.
Every pin must lie in its range and every declared dependency must be pinned."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent


def _pins(name: str) -> dict[str, str]:
    pins = {}
    for line in (ROOT / name).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            match = re.fullmatch(r"([A-Za-z0-9_.\-\[\]]+)==([^\s;]+)", line)
            assert match, f"{name}: '{line}' is not an exact pin (name==version)"
            pins[match.group(1).split("[")[0].lower().replace("_", "-")] = match.group(2)
    return pins


def _declared() -> dict[str, list[Requirement]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {"requirements.txt": [Requirement(r) for r in project["dependencies"]],
            "requirements-test.txt": [Requirement(r) for r in project["optional-dependencies"]["test"]]}


def test_every_pin_lies_in_the_declared_range_and_every_range_is_pinned() -> None:
    for file, requirements in _declared().items():
        pins = _pins(file)
        declared = {r.name.lower().replace("_", "-"): r for r in requirements}
        assert set(declared) == set(pins), f"{file} and pyproject.toml list different packages"
        for name, req in declared.items():
            version = pins[name].split("+")[0]  # a local build tag (torch's +cpu) is the same release
            assert req.specifier.contains(version, prereleases=True), \
                f"{file} pins {name}=={pins[name]}, outside pyproject.toml's '{req.specifier}'"


def test_the_jax_stack_is_bounded_by_the_newest_version_tested() -> None:
    declared = {r.name.lower(): r for r in _declared()["requirements.txt"]}
    for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint"):
        assert any(s.operator == "<=" for s in declared[name].specifier), \
            f"{name}: pyproject.toml must bound it by the newest version the suite ran on"
