"""CI step: the package's requirements (pyproject.toml) admit the newest torch, torchvision and transformers on
the package index.

Asks the index with ``pip index versions NAME`` (pip's own client, the configured index) and checks each newest
version against the requirement's specifiers (``packaging``). Exit 0: all admitted; 1: one is refused (the
message names it and the bound to lift or justify in tests/test_dependencies.py's KNOWN_BREAKS); 2: the index
could not be asked (offline): nothing was checked, which the message says (tests/test_dependencies.py checks the
bounds offline).

    python scripts/check_dependency_ranges.py [NAME ...]
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
DEFAULT = ("torch", "torchvision", "transformers")


def requirements() -> dict[str, Requirement]:
    """The package's own requirements (not its extras), by name."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return {r.name: r for r in map(Requirement, project["dependencies"])}


def newest(name: str) -> Version | None:
    """The newest release of ``name`` on the configured index (pre-releases excluded), or None if unreachable."""
    try:
        done = subprocess.run([sys.executable, "-m", "pip", "index", "versions", name, "--disable-pip-version-check"],
                              capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        return None
    match = re.search(rf"^{re.escape(name)} \(([^)]+)\)", done.stdout, flags=re.MULTILINE | re.IGNORECASE)
    return Version(match.group(1)) if done.returncode == 0 and match else None


def main(names: list[str]) -> int:
    reqs = requirements()
    refused, unknown = [], []
    for name in names or DEFAULT:
        if name not in reqs:
            print(f"{name}: not a requirement of the package ({', '.join(sorted(reqs))})")
            return 1
        version = newest(name)
        if version is None:
            unknown.append(name)
        elif reqs[name].specifier.contains(version):
            print(f"ok: {reqs[name]} admits {name} {version}, the newest on the index")
        else:
            refused.append(name)
            print(f"REFUSED: {reqs[name]} does not admit {name} {version}, the newest on the index: lift the bound "
                  "in pyproject.toml, or list the break it avoids in tests/test_dependencies.py KNOWN_BREAKS")
    if unknown:
        print(f"could not ask the package index about {', '.join(unknown)} (offline, or no index configured): "
              "not checked here; tests/test_dependencies.py checks the upper bounds offline")
    return 1 if refused else (2 if unknown else 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
