"""Images of the model app's slots, as `agogosml deploy --image` names them."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import yaml

from agogosml_cli.manifest import PORT_PATTERN

# REPOSITORY@sha256:DIGEST, REPOSITORY:TAG or TAG. A colon after the last
# slash separates the tag, so registry ports (host:5000/name) stay in the
# repository.
_DIGEST = re.compile(r"^(?P<repository>[^@]+)@(?P<digest>sha256:[0-9a-f]{64})$")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_COMPONENT = r"[a-z0-9](?:[a-z0-9._-]*[a-z0-9])?"
_REPOSITORY = re.compile(rf"^{_COMPONENT}(?::{PORT_PATTERN})?(?:/{_COMPONENT})*$")


_REPOSITORY_FORM = (
    "A repository has lower-case letters, digits, '.', '_' and '-' between "
    "slashes, and a registry may have a :PORT from 1 to 65535."
)


def _image_problem(text: str, repository: str, tag: str) -> str:
    """Return which part of an --image value is invalid, or '' if none is.

    `repository` and `tag` are `text` split at a colon after its last slash.
    """
    if "@" in text:
        named, _, digest = text.partition("@")
        if not named:
            return "the repository before '@' is missing."
        if ":" in named.rpartition("/")[2]:
            return (
                "an image with both a tag and a digest is not supported; give "
                "REPOSITORY@sha256:DIGEST or REPOSITORY:TAG."
            )
        if not _REPOSITORY.match(named):
            return f"the repository {named!r} is invalid. {_REPOSITORY_FORM}"
        return (
            f"the digest {digest!r} is invalid; a digest is 'sha256:' and 64 "
            "lower-case hexadecimal digits."
        )
    if not repository and "/" in text:
        return f"{text!r} has no tag; add one, as in {text + ':1.0'!r}."
    if repository == "sha256":
        # A repository named sha256 is possible, but far likelier a digest
        # without its repository, or a digest cut short.
        return (
            "it looks like a digest, which needs its repository and 64 "
            "hexadecimal digits; give REPOSITORY@sha256:DIGEST, as in "
            f"'my-app@sha256:{'0' * 64}', or a repository of another name."
        )
    if repository and not _REPOSITORY.match(repository):
        return f"the repository {repository!r} is invalid. {_REPOSITORY_FORM}"
    if not _TAG.match(tag):
        return (
            f"the tag {tag!r} is invalid. A tag has letters, digits, '_', '.' and "
            "'-', at most 128 characters."
        )
    return ""


@dataclass(frozen=True)
class ImageReference:
    """Image given to `deploy`: a tag, with a repository or a digest if given."""

    repository: str | None
    tag: str
    digest: str

    @classmethod
    def parse(cls, text: str) -> ImageReference:
        """Parse TAG, REPOSITORY:TAG or REPOSITORY@sha256:DIGEST."""
        match = _DIGEST.match(text)
        if match and _REPOSITORY.match(match["repository"]):
            return cls(match["repository"], "", match["digest"])
        repository, _, tag = text.rpartition(":")
        if "/" in tag or not repository:
            repository, tag = "", text
        problem = _image_problem(text, repository, tag)
        if problem:
            raise click.BadParameter(
                f"{text!r} is not an image tag, REPOSITORY:TAG or "
                f"REPOSITORY@sha256:DIGEST: {problem}",
                param_hint="--image",
            )
        return cls(repository or None, tag, "")

    def settings(self, slot: str) -> dict[str, str]:
        """Return the --set-string settings that put this image on `slot`."""
        prefix = f"app.slots.{slot}.image"
        settings = {f"{prefix}.tag": self.tag, f"{prefix}.digest": self.digest}
        if self.repository:
            settings[f"{prefix}.repository"] = self.repository
        return settings

    def matches(self, image: Mapping[str, str]) -> bool:
        """Return whether `image`, as `slot_image` returns it, is this image.

        A TAG without repository matches the tag in any repository, because
        `deploy --image TAG` keeps the slot's repository. A slot whose tag is
        empty (the chart's appVersion) matches no tag.
        """
        if self.repository and image["repository"] != self.repository:
            return False
        if self.digest:
            return image["digest"] == self.digest
        return not image["digest"] and image["tag"] == self.tag

    def __str__(self) -> str:
        if self.digest:
            return f"{self.repository}@{self.digest}"
        if self.repository:
            return f"{self.repository}:{self.tag}"
        return f"tag {self.tag}"


#: Keys of a slot's image in the chart values, under app.slots.<slot>.image.
IMAGE_KEYS = ("repository", "tag", "digest")

_MISSING = object()


def slot_image(layers: Sequence[Mapping[str, Any]], slot: str) -> dict[str, str]:
    """Return the repository, tag and digest of `slot` in layered values.

    Later layers override earlier ones key by key, as Helm merges values. A
    null value is skipped here, although Helm removes the key for it.
    """
    image: dict[str, str] = dict.fromkeys(IMAGE_KEYS, "")
    for layer in layers:
        found = _lookup(layer, ["app", "slots", slot, "image"])
        if not isinstance(found, Mapping):
            continue
        for key in IMAGE_KEYS:
            if found.get(key) is not None:
                image[key] = str(found[key])
    return image


def describe_image(image: Mapping[str, str]) -> str:
    """Return `image`, as `slot_image` returns it, as an image name for messages."""
    if image["digest"]:
        return f"{image['repository']}@{image['digest']}"
    if image["tag"]:
        return f"{image['repository']}:{image['tag']}"
    return f"{image['repository']} with the chart's appVersion as tag"


def image_settings(slot: str, image: Mapping[str, str]) -> dict[str, str]:
    """Return the --set-string settings that keep `slot` on `image`."""
    return {f"app.slots.{slot}.image.{key}": image[key] for key in IMAGE_KEYS}


def ignored_image_values(
    values_files: Sequence[Path], pinned: Mapping[str, str]
) -> list[str]:
    """Return a message for each pinned image value that a values file changes.

    A file that cannot be read as a YAML mapping is skipped, because Helm
    reports it when the upgrade reads it.
    """
    messages = []
    for path in values_files:
        values = _load_mapping(path)
        for key, pinned_value in pinned.items():
            found = _lookup(values, key.split("."))
            if found is _MISSING or found is None or str(found) == pinned_value:
                continue
            slot = key.split(".")[2]
            messages.append(
                f"{path} sets {key} to {str(found)!r}, but the upgrade keeps the "
                f"{slot} slot's image and sets it to {pinned_value!r}. Only `agogosml "
                f"deploy` onto the {slot} slot changes its image."
            )
    return messages


def check_image_values(values_files: Sequence[Path], slots: Sequence[str]) -> None:
    """Raise `click.UsageError` for slot values that a file gives as no mapping.

    The release commands set ``app.slots.<slot>.image.tag`` and its siblings,
    and Helm fails on a value that is not a mapping on that way (``app``,
    ``app.slots``, a slot or its image) with a Go error that names neither the
    key nor the file.
    """
    for path in values_files:
        values = _load_mapping(path)
        keys = ["app", "app.slots"]
        for slot in slots:
            keys += [f"app.slots.{slot}", f"app.slots.{slot}.image"]
        for key in keys:
            found = _lookup(values, key.split("."))
            if found is _MISSING or found is None or isinstance(found, Mapping):
                continue
            fix = (
                "write image: {repository: REPOSITORY, tag: TAG}, or leave it out "
                "and pass the image with --image"
                if key.endswith(".image")
                else "write the keys below it as the chart's values.yaml does"
            )
            raise click.UsageError(
                f"{path} sets {key} to {found!r}, but the chart takes a mapping "
                f"there: {fix}"
            )


def unset_service_images(values_files: Sequence[Path]) -> list[str]:
    """Return a warning for each of the reader and writer images no file sets.

    The chart's defaults name images without a registry. A cluster pulls them
    only if someone pushed them to its default registry under those names, so
    otherwise a new release waits for pods that never start.
    """
    loaded = [_load_mapping(path) for path in values_files]
    warnings = []
    for component in ("reader", "writer"):
        key = f"{component}.image.repository"
        if any(isinstance(_lookup(values, key.split(".")), str) for values in loaded):
            continue
        warnings.append(
            f"no --values file sets {key}, so the release uses the chart's "
            "image without a registry, which the cluster can rarely pull; set "
            f"{component}.image to the image you pushed (a generated project's "
            "helm/values.yaml does)"
        )
    return warnings


def _lookup(values: Any, keys: Sequence[str]) -> Any:
    for key in keys:
        if not isinstance(values, Mapping) or key not in values:
            return _MISSING
        values = values[key]
    return values


def _load_mapping(path: Path) -> Mapping[str, Any]:
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return {}
    return values if isinstance(values, Mapping) else {}
