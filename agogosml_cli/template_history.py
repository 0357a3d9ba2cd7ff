"""The template history that a generated project carries for Copier updates.

Copier updates a project by rendering the template version that generated it
and the new one, and merging the difference into the project. Both versions
must be commits of one git repository. The template ships inside this
package, so a generated project keeps that repository itself, as the git
bundle ``.agogosml/template.bundle``: one commit per template version, each
tagged with a PEP 440 version. `TemplateHistory` opens the project's bundle
(or starts an empty history), adds the packaged template as a new commit when
its files differ from every recorded version, and writes the bundle back.

A template version is the agogosml version. A template that changed without a
new agogosml version (a development install) gets ``<version>.post<N>``.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from types import TracebackType

from packaging.version import InvalidVersion, Version

from agogosml import __version__
from agogosml_cli.git import TEMPORARY_IDENTITY, GitError, run_git

TEMPLATE_DIR = Path(__file__).parent / "templates" / "pipeline"
BUNDLE_PATH = Path(".agogosml") / "template.bundle"
_IGNORED_NAMES = shutil.ignore_patterns("__pycache__", "*.pyc")


class TemplateHistory:
    """A temporary git repository with every template version of one project.

    Use it as a context manager; the repository is deleted on exit.
    """

    def __init__(self) -> None:
        self._tmp = Path(tempfile.mkdtemp(prefix="agogosml-template-"))
        self.repo = self._tmp / "template"

    def __enter__(self) -> TemplateHistory:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        shutil.rmtree(self._tmp, ignore_errors=True)

    def open(self, bundle: Path | None) -> None:
        """Start from the versions in `bundle`, or from none if it is None."""
        if bundle is None:
            run_git(
                ["init", "--quiet", "--initial-branch=main", str(self.repo)], self._tmp
            )
            return
        try:
            run_git(["clone", "--quiet", str(bundle), str(self.repo)], self._tmp)
        except GitError as exc:
            raise GitError(
                f"cannot read the template history {bundle}: {exc}; restore it "
                "from the project's git history"
            ) from None

    def versions(self) -> list[Version]:
        """Return the recorded template versions, oldest first."""
        tags = run_git(["tag", "--list"], self.repo).split()
        return sorted(_parse_version(tag) for tag in tags if _is_version(tag))

    def add_packaged_template(self) -> tuple[str, bool]:
        """Record the template shipped in this package.

        Returns:
            Its version tag, and whether it was added. When the packaged files
            equal a recorded version, that version's tag is returned and
            nothing is added.
        """
        tree = self._tree_of(TEMPLATE_DIR)
        for version in reversed(self.versions()):
            tag = str(version)
            if run_git(["rev-parse", f"{tag}^{{tree}}"], self.repo).strip() == tree:
                return tag, False
        tag = self._next_tag()
        self._commit_tree(tree, tag)
        return tag, True

    def write_bundle(self, target: Path) -> None:
        """Write every recorded version to the bundle file `target`.

        The bundle contains the branch, its HEAD and the version tags, but not the
        remote-tracking refs that a history opened from a bundle also has.
        """
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".partial")
        refs = ["HEAD", "refs/heads/main", "--tags"]
        run_git(["bundle", "create", "--quiet", str(partial), *refs], self.repo)
        partial.replace(target)

    def _tree_of(self, source: Path) -> str:
        """Store `source`'s files as a git tree in the repository; return its id."""
        work_tree = self._tmp / "work-tree"
        shutil.rmtree(work_tree, ignore_errors=True)
        shutil.copytree(source, work_tree, ignore=_IGNORED_NAMES)
        index = {"GIT_INDEX_FILE": str(self._tmp / "index")}
        git_dir = ["--git-dir", str(self.repo / ".git"), "--work-tree", str(work_tree)]
        run_git([*git_dir, "add", "--all", "--force", "."], work_tree, env=index)
        tree = run_git([*git_dir, "write-tree"], work_tree, env=index).strip()
        shutil.rmtree(work_tree)
        return tree

    def _commit_tree(self, tree: str, tag: str) -> None:
        parents: list[str] = []
        head = self._head()
        if head is not None:
            parents = ["-p", head]
        message = f"agogosml pipeline template {tag}"
        commit = run_git(
            ["commit-tree", tree, *parents, "-m", message],
            self.repo,
            env=TEMPORARY_IDENTITY,
        ).strip()
        run_git(["update-ref", "refs/heads/main", commit], self.repo)
        run_git(["tag", tag, commit], self.repo)
        run_git(["reset", "--quiet", "--hard", commit], self.repo)

    def _head(self) -> str | None:
        try:
            return run_git(
                ["rev-parse", "--verify", "--quiet", "HEAD"], self.repo
            ).strip()
        except GitError:
            return None

    def _next_tag(self) -> str:
        """Return the package version, or its next .postN if it is recorded."""
        base = Version(__version__)
        recorded = set(self.versions())
        if base not in recorded:
            return str(base)
        post = 1
        while Version(f"{base.base_version}.post{post}") in recorded:
            post += 1
        return f"{base.base_version}.post{post}"


def _is_version(tag: str) -> bool:
    try:
        Version(tag)
    except InvalidVersion:
        return False
    return True


def _parse_version(tag: str) -> Version:
    return Version(tag)
