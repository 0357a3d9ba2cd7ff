"""Images of the model app's slots, as `agogosml deploy --image` names them."""

from __future__ import annotations

import re
from dataclasses import dataclass

import click

# REPOSITORY@sha256:DIGEST, REPOSITORY:TAG or TAG. A colon after the last
# slash separates the tag, so registry ports (host:5000/name) stay in the
# repository.
_DIGEST = re.compile(r"^(?P<repository>[^@]+)@(?P<digest>sha256:[0-9a-f]{64})$")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_COMPONENT = r"[a-z0-9](?:[a-z0-9._-]*[a-z0-9])?"
_REPOSITORY = re.compile(rf"^{_COMPONENT}(?::[0-9]+)?(?:/{_COMPONENT})*$")


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
        if not _TAG.match(tag) or (repository and not _REPOSITORY.match(repository)):
            raise click.BadParameter(
                f"{text!r} is not an image tag, REPOSITORY:TAG or "
                "REPOSITORY@sha256:DIGEST. A tag has letters, digits, '_', '.' and "
                "'-', at most 128 characters.",
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

    def __str__(self) -> str:
        if self.digest:
            return f"{self.repository}@{self.digest}"
        if self.repository:
            return f"{self.repository}:{self.tag}"
        return f"tag {self.tag}"
