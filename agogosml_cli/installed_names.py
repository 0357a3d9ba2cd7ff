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


#: Distributions of a generated project, by normalized name, as recorded from
#: the dependency tree; `installed_names` adds any that the installed tree has
#: beyond these.
_RECORDED_DISTRIBUTIONS = {
    "agogosml": "agogosml",
    "aiohappyeyeballs": "aiohappyeyeballs",
    "aiohttp": "aiohttp",
    "aiosignal": "aiosignal",
    "annotated-types": "annotated-types",
    "attrs": "attrs",
    "azure-core": "azure-core",
    "azure-eventhub": "azure-eventhub",
    "azure-eventhub-checkpointstoreblob-aio": "azure-eventhub-checkpointstoreblob-aio",
    "azure-identity": "azure-identity",
    "backports-zstd": "backports.zstd",
    "brotli": "brotli",
    "certifi": "certifi",
    "cffi": "cffi",
    "charset-normalizer": "charset-normalizer",
    "click": "click",
    "cloudpickle": "cloudpickle",
    "colorama": "colorama",
    "confluent-kafka": "confluent-kafka",
    "copier": "copier",
    "cryptography": "cryptography",
    "docker": "docker",
    "dunamai": "dunamai",
    "frozenlist": "frozenlist",
    "funcy": "funcy",
    "idna": "idna",
    "iniconfig": "iniconfig",
    "isodate": "isodate",
    "jinja2": "Jinja2",
    "jinja2-ansible-filters": "jinja2-ansible-filters",
    "joblib": "joblib",
    "markdown-it-py": "markdown-it-py",
    "markupsafe": "MarkupSafe",
    "mdurl": "mdurl",
    "msal": "msal",
    "msal-extensions": "msal-extensions",
    "multidict": "multidict",
    "narwhals": "narwhals",
    "numpy": "numpy",
    "orjson": "orjson",
    "packaging": "packaging",
    "pandas": "pandas",
    "pathspec": "pathspec",
    "pip": "pip",
    "platformdirs": "platformdirs",
    "pluggy": "pluggy",
    "plumbum": "plumbum",
    "prometheus-client": "prometheus_client",
    "prompt-toolkit": "prompt_toolkit",
    "propcache": "propcache",
    "pycparser": "pycparser",
    "pydantic": "pydantic",
    "pydantic-core": "pydantic_core",
    "pydantic-settings": "pydantic-settings",
    "pygments": "Pygments",
    "pyjwt": "PyJWT",
    "pytest": "pytest",
    "pytest-asyncio": "pytest-asyncio",
    "python-dateutil": "python-dateutil",
    "python-dotenv": "python-dotenv",
    "pyyaml": "PyYAML",
    "questionary": "questionary",
    "requests": "requests",
    "rich": "rich",
    "scikit-learn": "scikit-learn",
    "scipy": "scipy",
    "setuptools": "setuptools",
    "threadpoolctl": "threadpoolctl",
    "typing-extensions": "typing_extensions",
    "typing-inspection": "typing-inspection",
    "tzdata": "tzdata",
    "urllib3": "urllib3",
    "uvloop": "uvloop",
    "wcwidth": "wcwidth",
    "wheel": "wheel",
    "yarl": "yarl",
}
#: Their top-level modules, each with its distribution.
_RECORDED_MODULES = {
    "_brotli": "brotli",
    "_cffi_backend": "cffi",
    "_distutils_hack": "setuptools",
    "_pytest": "pytest",
    "_yaml": "PyYAML",
    "agogosml": "agogosml",
    "agogosml_cli": "agogosml",
    "aiohappyeyeballs": "aiohappyeyeballs",
    "aiohttp": "aiohttp",
    "aiosignal": "aiosignal",
    "annotated_types": "annotated-types",
    "attr": "attrs",
    "attrs": "attrs",
    "azure": "azure-identity",
    "backports": "backports.zstd",
    "brotli": "brotli",
    "certifi": "certifi",
    "cffi": "cffi",
    "charset_normalizer": "charset-normalizer",
    "click": "click",
    "cloudpickle": "cloudpickle",
    "colorama": "colorama",
    "confluent_kafka": "confluent-kafka",
    "copier": "copier",
    "cryptography": "cryptography",
    "dateutil": "python-dateutil",
    "docker": "docker",
    "dotenv": "python-dotenv",
    "dunamai": "dunamai",
    "frozenlist": "frozenlist",
    "funcy": "funcy",
    "idna": "idna",
    "images": "azure-identity",
    "iniconfig": "iniconfig",
    "isodate": "isodate",
    "jinja2": "Jinja2",
    "jinja2_ansible_filters": "jinja2-ansible-filters",
    "joblib": "joblib",
    "jwt": "PyJWT",
    "markdown_it": "markdown-it-py",
    "markupsafe": "MarkupSafe",
    "mdurl": "mdurl",
    "msal": "msal",
    "msal_extensions": "msal-extensions",
    "multidict": "multidict",
    "narwhals": "narwhals",
    "numpy": "numpy",
    "orjson": "orjson",
    "packaging": "packaging",
    "pandas": "pandas",
    "pathspec": "pathspec",
    "pip": "pip",
    "pkg_resources": "setuptools",
    "platformdirs": "platformdirs",
    "pluggy": "pluggy",
    "plumbum": "plumbum",
    "prometheus_client": "prometheus_client",
    "prompt_toolkit": "prompt_toolkit",
    "propcache": "propcache",
    "py": "pytest",
    "pycparser": "pycparser",
    "pydantic": "pydantic",
    "pydantic_core": "pydantic_core",
    "pydantic_settings": "pydantic-settings",
    "pygments": "Pygments",
    "pytest": "pytest",
    "pytest_asyncio": "pytest-asyncio",
    "questionary": "questionary",
    "requests": "requests",
    "rich": "rich",
    "sample_app": "agogosml",
    "scipy": "scipy",
    "setuptools": "setuptools",
    "sklearn": "scikit-learn",
    "threadpoolctl": "threadpoolctl",
    "typing_extensions": "typing_extensions",
    "typing_inspection": "typing-inspection",
    "tzdata": "tzdata",
    "urllib3": "urllib3",
    "uvloop": "uvloop",
    "wcwidth": "wcwidth",
    "wheel": "wheel",
    "yaml": "PyYAML",
    "yarl": "yarl",
}


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

    The recorded names count whatever is installed, so that a manifest is
    valid or invalid alike on every machine. The installed tree adds names
    of newer dependencies.
    """
    walked = walk_installed()
    return InstalledNames(
        {**walked.distributions, **_RECORDED_DISTRIBUTIONS},
        {**walked.modules, **_RECORDED_MODULES},
    )


def walk_installed() -> InstalledNames:
    """Return the names of the installed dependency tree of a generated project.

    Requirements whose environment markers exclude this platform are skipped.
    A distribution that is not installed counts by name, with its name (``-``
    as ``_``) as its module, and its own requirements are unknown.
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
