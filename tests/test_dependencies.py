"""The package's requirements are a library's: no upper bound on a dependency unless the code is known to break
there (each allowed bound is listed below with its reason), and this project's own pins live in the install
script's constraints file (scripts/constraints.txt), inside the package's ranges.

Whether the newest releases on the package index are admitted is checked against the index by
``scripts/check_dependency_ranges.py`` (network; a CI step); here the property that implies it for torch,
torchvision and transformers is checked offline: no bound above the pins except the listed ones."""

from __future__ import annotations

from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]

# name -> why an upper bound is allowed (the break it avoids). Any other upper bound fails the test.
KNOWN_BREAKS = {
    "filelock": "<4.3: a known break: lmms-eval 0.7.3's evaluator imports filelock._api, which 4.3 removed",
    "lmms-eval": "<0.8: 0.x guard: the wrappers subclass lmms-eval's model API (Instance args, ChatMessages, "
                 "log_metrics, Collator), which has changed between 0.x minors",
    "transformers": "<6: major guard: the families patch transformers 5's model internals (forward signatures, "
                    "cache classes), which a major release renames",
    "jsonschema": "<5: major guard: bundles are validated through jsonschema 4's validator classes",
    "sentencepiece": "<0.3 (dev): 0.x guard for the InternVL conversion test's SentencePiece model protos",
    "playwright": "<2 (dev): major guard for the page test's sync API",
    "decord": "<0.7 (dev, video): 0.x guard for the VideoReader API that lmms-eval's video wrappers call",
    "av": "<16 (dev): major guard for the PyAV encoder API that writes the tiny video task's clips",
    "ms-vlmeval": "<0.1 (vlmeval): 0.0.x guard for the vlmeval dataset classes the VLMEvalKit glue imports",
    "mkdocs": "<2 (docs): major guard: mkdocs.yml's strict validation keys and the built-in readthedocs theme are "
              "MkDocs 1's",
    "mkdocstrings": "<2 (docs): major guard for the `::: module` blocks and handler options of docs/api.md",
    "mkdocstrings-python": "<3 (docs): major guard for the Python handler options in mkdocs.yml (docstring_options, "
                           "filters)",
}
UNCAPPED = ("torch", "torchvision", "transformers")  # the newest of these must always be admitted


def _requirements() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = [r for reqs in project["optional-dependencies"].values() for r in reqs]
    return [Requirement(r) for r in project["dependencies"] + extras]


def _constraints() -> dict[str, Version]:
    pins = {}
    for line in (REPO / "scripts" / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", f"{line!r}: a constraints pin must be exact (==)"
            pins[req.name] = Version(spec.version)
    return pins


def _has_upper_bound(req: Requirement) -> bool:
    return any(s.operator in ("<", "<=", "==", "===", "~=") for s in req.specifier)


def test_no_upper_bound_except_the_known_breaks():
    capped = {r.name for r in _requirements() if _has_upper_bound(r)}
    assert capped <= set(KNOWN_BREAKS), f"upper bounds without a known break: {sorted(capped - set(KNOWN_BREAKS))}"
    assert set(KNOWN_BREAKS) <= capped, f"stale KNOWN_BREAKS entries: {sorted(set(KNOWN_BREAKS) - capped)}"


@pytest.mark.parametrize("name", ["torch", "torchvision"])
def test_torch_and_torchvision_admit_any_newer_release(name):
    (req,) = [r for r in _requirements() if r.name == name]
    pin = _constraints()[name]
    # the case (torch 2.15 / torchvision 0.30) and far-future majors
    for newer in (Version(f"{pin.major}.{pin.minor + 1}.0"), Version(f"{pin.major + 1}.0"), Version("99.0")):
        assert req.specifier.contains(newer), f"{req} refuses {name} {newer}"


def test_the_install_pins_are_inside_the_package_ranges():
    pins = _constraints()
    assert set(pins) == {"torch", "torchvision"}
    reqs = {r.name: r for r in _requirements()}
    for name, version in pins.items():
        assert reqs[name].specifier.contains(version), f"scripts/constraints.txt pins {name}=={version}, " \
                                                       f"outside pyproject's {reqs[name]}"
    env = (REPO / "scripts" / "env.sh").read_text()
    assert '-c "$CONSTRAINTS"' in env and "scripts/constraints.txt" in env
    assert "torch==" not in env  # the pins live in the constraints file only
