"""Names that a generated project installs besides its own package.

A project whose distribution name is that of one of its dependencies cannot be
installed (pip finds two requirements of one name), and a project package with
the name of a dependency's module shadows that module. Both sets come from the
metadata of the installed distributions, from agogosml's requirements down.
"""

from __future__ import annotations

import functools
import importlib.metadata
import re
from typing import NamedTuple

from packaging.requirements import InvalidRequirement, Requirement

#: Requirements of a generated project: agogosml with the extra of the fraud
#: template, the test tools of its ``test`` extra, and the build tools.
PROJECT_REQUIREMENTS = (
    "agogosml[sample]",
    "pytest",
    "pytest-asyncio",
    "pip",
    "setuptools",
    "wheel",
)


class InstalledNames(NamedTuple):
    """Distribution names (normalized) and the top-level modules they provide."""

    distributions: dict[str, str]
    modules: dict[str, str]


def normalize(name: str) -> str:
    """Return a distribution name as PEP 503 compares it."""
    return re.sub(r"[-_.]+", "-", name).lower()


@functools.cache
def installed_names() -> InstalledNames:
    """Return the names that a generated project installs, each with its distribution.

    Requirements whose environment markers exclude this platform are skipped.
    A distribution that is not installed here counts by name, with its name
    (``-`` as ``_``) as its module.
    """
    distributions: dict[str, str] = {}
    modules: dict[str, str] = {}
    pending = [(text, "") for text in PROJECT_REQUIREMENTS]
    while pending:
        text, extra = pending.pop()
        try:
            requirement = Requirement(text)
        except InvalidRequirement:
            continue
        if requirement.marker is not None and not requirement.marker.evaluate(
            {"extra": extra}
        ):
            continue
        key = normalize(requirement.name)
        if key in distributions and not requirement.extras:
            continue
        try:
            distribution = importlib.metadata.distribution(requirement.name)
        except importlib.metadata.PackageNotFoundError:
            distributions.setdefault(key, requirement.name)
            modules.setdefault(key.replace("-", "_"), requirement.name)
            continue
        name = distribution.metadata["Name"] or requirement.name
        distributions.setdefault(key, name)
        for module in _top_level_modules(distribution):
            modules.setdefault(module, name)
        for extra_name in ("", *sorted(requirement.extras)):
            pending.extend((child, extra_name) for child in distribution.requires or ())
    return InstalledNames(distributions, modules)


def _top_level_modules(distribution: importlib.metadata.Distribution) -> set[str]:
    """Return the importable top-level names of an installed distribution."""
    listed = distribution.read_text("top_level.txt")
    if listed:
        return set(listed.split())
    modules = set()
    for path in distribution.files or ():
        first = path.parts[0]
        if first == ".." or first.endswith((".dist-info", ".data", ".egg-info")):
            continue
        if first == "__pycache__":
            continue
        if len(path.parts) > 1:
            modules.add(first)
        elif path.suffix in (".py", ".so", ".pyd"):
            modules.add(path.name.split(".")[0])
    return {module for module in modules if module.isidentifier()}
