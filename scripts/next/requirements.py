"""Print the requirements of the next release stack: pyproject.toml's dependencies and the
`dev` and `postgres` extras, with the packages named in `[tool.rld] next-stack` replaced by
those pins (pip has no "override": the default stack's upper bounds would block them).

    python scripts/next/requirements.py > .venv-next/requirements.txt   # what `make test-next` does
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"
EXTRAS = ("dev", "postgres")


def name(requirement: str) -> str:
    """The normalised project name of a requirement string (PEP 503)."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if match is None:
        raise ValueError(f"not a requirement: {requirement!r}")
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def requirements(pyproject: dict) -> list[str]:
    project = pyproject["project"]
    self_name = name(project["name"])
    extras = project.get("optional-dependencies", {})
    todo, seen, out = list(EXTRAS), set(), list(project["dependencies"])
    while todo:  # extras may name other extras of this project: rld[dashboard]
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for req in extras[extra]:
            if name(req) == self_name:
                todo.extend(re.search(r"\[(.*)\]", req).group(1).split(","))
            else:
                out.append(req)
    pins = pyproject["tool"]["rld"]["next-stack"]
    pinned = {name(p) for p in pins}
    return [r for r in out if name(r) not in pinned] + list(pins)


if __name__ == "__main__":
    sys.stdout.write("\n".join(requirements(tomllib.loads(PYPROJECT.read_text()))) + "\n")
