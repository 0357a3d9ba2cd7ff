"""Render a pipeline project with Copier, or update a project rendered before.

The first render goes into an empty directory. `git init` runs there unless it
is in a git repository already, and the render is committed, because Copier's
update needs that commit to tell the template's changes from the user's. A
directory inside another repository, not at its root, gets the commit only
with ``commit_to_enclosing_repository=True``: otherwise nothing is written
and `EnclosingRepositoryError` names that repository. Nothing is written
either when git would leave the directory, or a rendered file, out of the
commit because an ignore rule matches it: `IgnoredPathsError` names the rule.

The project installs agogosml from the wheel in ``wheels/``, which
`agogosml_cli.wheel` writes at the first render and replaces at an update when
agogosml changed. Copier does not render that directory, so it never conflicts.

An update runs ``copier.run_update`` in a temporary clone of the project's
repository. If Copier merged every change, the difference is applied to the
project's work tree and left uncommitted for review, with the files it adds
marked with ``git add --intent-to-add``, so that ``git diff HEAD`` shows them
and ``git commit -a`` commits them. If a template change
overlaps a user edit of the same lines, the project is left as it was and
`UpdateConflictError` names the conflicting files.
"""

from __future__ import annotations

import contextlib
import shlex
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import copier
import yaml
from copier.errors import CopierError
from packaging.version import InvalidVersion, Version

from agogosml.errors import AgogosmlError
from agogosml_cli.git import TEMPORARY_IDENTITY, GitError, run_git
from agogosml_cli.resolve import resolve
from agogosml_cli.template_history import BUNDLE_PATH, TemplateHistory
from agogosml_cli.wheel import write_wheel

ANSWERS_FILE = Path(".copier-answers.yml")
#: Answers that a project rename changes, and with them paths in the project.
_NAME_FIELDS = ("project_name", "package_name")


class GenerateError(AgogosmlError):
    """The project cannot be rendered or updated; the message gives the reason."""


class EnclosingRepositoryError(GenerateError):
    """A first render would commit into a repository rooted above the project."""

    def __init__(self, message: str, repository: Path) -> None:
        super().__init__(message)
        self.repository = repository


class IgnoredPathsError(GenerateError):
    """Ignore rules would keep the project, or files of it, out of its commit."""


class UpdateConflictError(GenerateError):
    """Template changes overlap user edits; `paths` lists the files."""

    def __init__(self, message: str, paths: list[str]) -> None:
        super().__init__(message)
        self.paths = paths


#: The words for the status letters of ``git diff --name-status``.
_CHANGE_KINDS = {
    "A": "added",
    "C": "copied",
    "D": "deleted",
    "M": "modified",
    "R": "renamed",
    "T": "type changed",
}


class Change(NamedTuple):
    """A file that a render or an update changed.

    Paths are relative to the repository root. `kind` is "added", "modified",
    "deleted", "renamed", "copied" or "type changed"; a renamed or copied
    file has the path it came from in `source`.
    """

    kind: str
    path: str
    source: str | None = None

    @property
    def added(self) -> bool:
        """True when the change creates the file at `path`."""
        return self.kind in ("added", "renamed", "copied")


@dataclass(frozen=True)
class Outcome:
    """Result of `generate_project`.

    Attributes:
        created: True for a first render, False for an update.
        template_version: The template version now recorded in the project.
        changed: The files that the render or the update changed.
        commit: The commit of a first render, if one was made.
        repository: The root of the git work tree that contains the project.
        identity_fallback: True when git had no user identity, so the first
            render was committed as "agogosml <agogosml@localhost>".
        not_applied: Paths (relative to the repository root) of generated
            files that an update changed but did not write, because the
            project no longer has them.
        deleted_edits: Paths (relative to the repository root) of generated
            files that the user had edited and that an update deleted, because
            the manifest no longer generates them.
        renamed: True when an update gave the project a new name.
        previous_name: The project name before that update, or "".
    """

    created: bool
    template_version: str
    changed: list[Change]
    commit: str | None = None
    repository: Path | None = None
    identity_fallback: bool = False
    not_applied: list[str] = field(default_factory=list)
    deleted_edits: list[str] = field(default_factory=list)
    renamed: bool = False
    previous_name: str = ""


def generate_project(
    answers: dict[str, Any],
    project: Path,
    *,
    manifest_path: Path | None = None,
    commit_to_enclosing_repository: bool = False,
) -> Outcome:
    """Render the template into `project`, or update the project rendered there.

    Args:
        answers: The Copier answers, from `template_answers`.
        project: The project directory.
        manifest_path: The manifest file. Its own changes do not count as
            uncommitted changes of the project, and a first render may go into
            the directory that contains it.
        commit_to_enclosing_repository: Let a first render commit into the git
            repository that contains `project` when `project` is not its root.
            Updates commit nothing, so they ignore it.

    Raises:
        GenerateError: The directory is not empty, the project has uncommitted
            changes, or git or Copier failed.
        EnclosingRepositoryError: A first render would commit into a
            repository rooted above `project`, and
            `commit_to_enclosing_repository` is False.
        IgnoredPathsError: Ignore rules match `project` or rendered files, so
            a first render's commit would leave them out.
        UpdateConflictError: An update cannot merge cleanly.
    """
    try:
        project = resolve(project)
        manifest_file = resolve(manifest_path) if manifest_path else None
    except ValueError as exc:
        raise GenerateError(str(exc)) from None
    try:
        if (project / ANSWERS_FILE).exists():
            return _update(project, answers, manifest_file)
        return _render_new(
            project, answers, manifest_file, commit_to_enclosing_repository
        )
    except CopierError as exc:
        raise GenerateError(f"copier failed: {exc}") from None


# ---------------------------------------------------------------------------
# First render
# ---------------------------------------------------------------------------


def _render_new(
    project: Path,
    answers: dict[str, Any],
    manifest_file: Path | None,
    commit_to_enclosing_repository: bool,
) -> Outcome:
    _check_empty(project, manifest_file)
    _check_repository(project, commit_to_enclosing_repository)
    existed = project.exists()
    try:
        project.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise GenerateError(
            f"cannot create the project directory {str(project)!r}: "
            f"{exc.strerror or exc}; pass another directory with --output"
        ) from None
    before = {path.name for path in project.iterdir()}
    try:
        with TemplateHistory() as history:
            history.open(None)
            tag, _ = history.add_packaged_template()
            history.write_bundle(project / BUNDLE_PATH)
        _copy(project, answers, tag)
        write_wheel(project)
        return _commit_first_render(project, answers["project_name"], tag)
    except BaseException:
        # Leave the directory as it was, so that a second run finds it empty.
        _remove_new_entries(project, before, remove_directory=not existed)
        raise


def _check_repository(project: Path, commit_to_enclosing_repository: bool) -> None:
    """Check that the first render can be committed where it would be.

    The first render is committed, and a commit into a repository that only
    contains the project, such as the user's clone of another project, would
    land in a history that the user did not choose. So without
    `commit_to_enclosing_repository` such a repository is an error. A
    project directory that the enclosing repository ignores cannot be
    committed there at all.

    Raises:
        EnclosingRepositoryError: A repository above `project` contains it,
            and `commit_to_enclosing_repository` is False.
        IgnoredPathsError: A repository above `project` ignores it.
    """
    existing = project
    while not existing.is_dir():
        existing = existing.parent
    try:
        output = run_git(["rev-parse", "--show-toplevel"], existing)
    except GitError:
        # Not in a work tree, so the first render runs `git init`. A missing
        # git fails there.
        return
    repository = Path(output.strip()).resolve()
    if repository == project:
        return
    # The trailing slash makes the path a directory, as the project will be,
    # so that rules for directories only ("build/") apply to it too.
    relative = project.relative_to(repository).as_posix() + "/"
    rule = _ignore_rules(repository, repository, [relative]).get(relative)
    if rule is not None:
        target = shlex.quote(str(project))
        raise IgnoredPathsError(
            f"{project} is inside the git repository at {repository}, which "
            f"ignores it by the rule {rule}, so the generated project cannot be "
            "committed there; nothing was written. Run 'git init "
            f"{target}' to give the project a repository of its own (the rule "
            f"keeps it out of {repository}), pass an --output that the rule "
            "does not match, or change the rule and pass "
            f"--commit-to-enclosing-repository to commit the project into "
            f"{repository}"
        )
    if commit_to_enclosing_repository:
        return
    raise EnclosingRepositoryError(
        f"{project} is inside the git repository at {repository}, so the commit "
        "of the generated project would go into that repository; nothing was "
        f"written. Run 'git init {shlex.quote(str(project))}' to give the project "
        "a repository of its own, pass --commit-to-enclosing-repository to commit "
        f"it into {repository}, or pass an --output outside that repository",
        repository,
    )


def _remove_new_entries(
    project: Path, before: set[str], *, remove_directory: bool
) -> None:
    if remove_directory:
        shutil.rmtree(project, ignore_errors=True)
        return
    for path in project.iterdir():
        if path.name in before:
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _check_empty(project: Path, manifest_file: Path | None) -> None:
    if not project.exists():
        return
    if not project.is_dir():
        raise GenerateError(f"{project} is not a directory; pass another --output")
    allowed = {".git"}
    if manifest_file is not None and manifest_file.parent == project:
        allowed.add(manifest_file.name)
    others = sorted(path.name for path in project.iterdir() if path.name not in allowed)
    if others:
        listed = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
        generated = sorted(
            str(answers.parent) for answers in project.glob(f"*/{ANSWERS_FILE}")
        )
        hint = "pass an empty or new directory as --output"
        if generated:
            hint = (
                f"to update the generated project in {generated[0]}, pass "
                f"--output {generated[0]}; for a new project, {hint}"
            )
        raise GenerateError(
            f"{project} is not empty ({listed}) and has no {ANSWERS_FILE}, so it "
            f"is not a generated project; {hint}"
        )


def _copy(project: Path, answers: dict[str, Any], tag: str) -> None:
    # The answers file records the source path as given. A path relative to the
    # project keeps it valid wherever the repository is cloned.
    with contextlib.chdir(project):
        copier.run_copy(
            str(BUNDLE_PATH),
            ".",
            data=answers,
            vcs_ref=tag,
            defaults=True,
            overwrite=True,
            quiet=True,
        )


def _render(directory: Path, bundle: Path, answers: dict[str, Any], tag: str) -> None:
    """Render version `tag` of the template history `bundle` into `directory`."""
    (directory / BUNDLE_PATH).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(bundle, directory / BUNDLE_PATH)
    _copy(directory, answers, tag)
    (directory / BUNDLE_PATH).unlink()


def _commit_first_render(project: Path, name: str, tag: str) -> Outcome:
    """Commit the render in `project`, running `git init` there if needed.

    If the commit fails in a repository that was there before, the files that
    it would have added are taken out of the index again, so that the caller
    can remove the render and leave the repository as it was.
    """
    initialized = not _inside_work_tree(project)
    if initialized:
        run_git(["init", "--quiet", "--initial-branch=main"], project)
    repository = Path(
        run_git(["rev-parse", "--show-toplevel"], project).strip()
    ).resolve()
    _check_nothing_ignored(project, repository)
    new_files = _split_z(
        run_git(
            ["ls-files", "-z", "--others", "--exclude-standard", "--", "."], project
        )
    )
    try:
        run_git(["add", "--all", "--", "."], project)
        changed = [
            Change("added", path)
            for path in _split_z(
                run_git(["diff", "--cached", "--name-only", "-z", "--", "."], project)
            )
        ]
        identity: dict[str, str] = {}
        if not _has_identity(project):
            identity = TEMPORARY_IDENTITY
        message = f"Generate {name} from the agogosml pipeline template {tag}"
        run_git(["commit", "--quiet", "-m", message, "--", "."], project, env=identity)
    except BaseException:
        if not initialized and new_files:
            with contextlib.suppress(GitError):
                run_git(
                    [
                        "--literal-pathspecs",
                        "rm",
                        "--cached",
                        "--quiet",
                        "--ignore-unmatch",
                        "--",
                        *new_files,
                    ],
                    project,
                )
        raise
    commit = run_git(["rev-parse", "--short", "HEAD"], project).strip()
    return Outcome(
        created=True,
        template_version=tag,
        changed=changed,
        commit=commit,
        repository=repository,
        identity_fallback=bool(identity),
    )


def _check_nothing_ignored(project: Path, repository: Path) -> None:
    """Raise `IgnoredPathsError` if git ignores files in `project`.

    ``git add --all`` skips ignored files without a word, so the commit of the
    render would lack them: rules of an enclosing repository such as
    ``.agogosml/`` or ``*.whl``, or of the user's global excludes file, would
    drop the template history or the wheel, and updates would fail.
    """
    ignored = _split_z(
        run_git(
            [
                "ls-files",
                "-z",
                "--others",
                "--ignored",
                "--exclude-standard",
                "--",
                ".",
            ],
            project,
        )
    )
    if not ignored:
        return
    rules = _ignore_rules(project, repository, ignored)
    listed = [f"{path} (rule {rules.get(path, 'unknown')})" for path in ignored]
    advice = (
        "change those rules so that they do not match these files (a later "
        "'!PATTERN' line makes an exception)"
    )
    if repository != project:
        advice = (
            f"run 'git init {shlex.quote(str(project))}' to give the project a "
            f"repository of its own, outside the rules of {repository}, or {advice}"
        )
    raise IgnoredPathsError(
        "git ignores some generated files, so the commit of the project would leave "
        f"them out: {_listing(listed, 5)}; nothing was written. To generate the "
        f"project, {advice}, and run 'agogosml generate' again"
    )


def _ignore_rules(cwd: Path, top: Path, paths: list[str]) -> dict[str, str]:
    """Return the rule that makes git ignore each of `paths`, by path.

    Paths are relative to `cwd`, in the work tree whose root is `top`, and a
    path that git does not ignore is left out. A rule reads "'PATTERN' at
    FILE:LINE".
    """
    output = run_git(
        ["check-ignore", "--no-index", "--verbose", "-z", "--stdin"],
        cwd,
        input_text="".join(f"{path}\0" for path in paths),
        ok_codes=(0, 1),
    )
    fields = output.split("\0")
    rules = {}
    for index in range(0, len(fields) - 3, 4):
        source, line, pattern, path = fields[index : index + 4]
        if not pattern or pattern.startswith("!"):
            # -v also shows the negation that makes git not ignore a path.
            continue
        source_path = Path(source).expanduser()
        if not source_path.is_absolute():
            # git names the files of the work tree relative to its root.
            source_path = top / source_path
        rules[path] = f"'{pattern}' at {source_path}:{line}"
    return rules


def _inside_work_tree(path: Path) -> bool:
    try:
        output = run_git(["rev-parse", "--is-inside-work-tree"], path)
    except GitError:
        return False
    return output.strip() == "true"


def _has_identity(path: Path) -> bool:
    try:
        run_git(["var", "GIT_COMMITTER_IDENT"], path)
        run_git(["var", "GIT_AUTHOR_IDENT"], path)
    except GitError:
        return False
    return True


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line]


def _split_z(text: str) -> list[str]:
    """Return the fields of git output separated by NUL (-z), without quoting."""
    return [field for field in text.split("\0") if field]


# ---------------------------------------------------------------------------
# Update
# ---------------------------------------------------------------------------


def _update(
    project: Path, answers: dict[str, Any], manifest_file: Path | None
) -> Outcome:
    top = _repository_root(project)
    subdirectory = project.relative_to(top)
    _check_clean(top, project, manifest_file)
    recorded = _recorded_version(project)
    head = run_git(["rev-parse", "HEAD"], top).strip()
    with tempfile.TemporaryDirectory(prefix="agogosml-update-") as tmp:
        clone = Path(tmp) / "project"
        run_git(["clone", "--quiet", str(top), str(clone)], top)
        work = clone / subdirectory
        tag = _record_template(work, recorded)
        names = _recorded_names(project)
        with contextlib.chdir(work):
            try:
                copier.run_update(
                    ".",
                    data={**answers, **names},
                    vcs_ref=tag,
                    defaults=True,
                    overwrite=True,
                    quiet=True,
                    conflict="inline",
                )
            except ValueError as exc:
                # Copier raises ValueError for answers it cannot use, such as
                # a template version that the history does not contain.
                raise GenerateError(
                    f"cannot update from {project / ANSWERS_FILE}: {exc}; restore "
                    "the file from the project's git history"
                ) from None
        _raise_on_conflicts(clone)
        differences = _render_differences(
            work, project, _recorded_answers(project), {**answers, **names}, tag
        )
        not_applied = [
            (subdirectory / path).as_posix() for path in differences.not_applied
        ]
        if names != _names(answers):
            renamed_deleted = _rename(
                clone, subdirectory, {**answers, **names}, answers, tag
            )
            not_applied = sorted({*not_applied, *renamed_deleted})
        write_wheel(work)
        changed, patch = _staged_changes(clone, subdirectory, head)
    if patch:
        run_git(
            ["apply", "--binary", "--whitespace=nowarn", "-"], top, input_text=patch
        )
        _mark_added(top, [change.path for change in changed if change.added])
    return Outcome(
        created=False,
        template_version=tag,
        changed=changed,
        repository=top,
        not_applied=not_applied,
        deleted_edits=[
            (subdirectory / path).as_posix() for path in differences.deleted_edits
        ],
        renamed=names != _names(answers),
        previous_name=str(names.get("project_name") or "")
        if names != _names(answers)
        else "",
    )


class _RenderDifferences(NamedTuple):
    """Generated files that an update handles differently from the template."""

    #: Changed by the template or the answers, but missing from the project.
    not_applied: list[Path]
    #: No longer generated, so deleted, although the user had edited them.
    deleted_edits: list[Path]


def _render_differences(
    work: Path,
    project: Path,
    recorded: dict[str, Any],
    answers: dict[str, Any],
    tag: str,
) -> _RenderDifferences:
    """Compare two renders with the project before (`project`) and after (`work`).

    Copier's update leaves out a file that the project no longer has, deleted
    or renamed by the user, even when the new template or the new answers
    change it. It also deletes a file that the new answers no longer generate,
    such as the Helm values of a pipeline whose sink became a file, edits and
    all. Two renders, of the recorded version with the recorded answers and of
    `tag` with `answers`, show both.
    """
    bundle = work / BUNDLE_PATH
    before = {key: value for key, value in recorded.items() if not key.startswith("_")}
    with tempfile.TemporaryDirectory(prefix="agogosml-renders-") as tmp:
        old, new = Path(tmp) / "old", Path(tmp) / "new"
        _render(old, bundle, before, str(recorded.get("_commit")))
        _render(new, bundle, answers, tag)
        differences = _RenderDifferences([], [])
        for path in sorted(new.rglob("*")):
            relative = path.relative_to(new)
            if not path.is_file() or (work / relative).exists():
                continue
            previous = old / relative
            if not previous.is_file() or previous.read_bytes() != path.read_bytes():
                differences.not_applied.append(relative)
        for path in sorted(old.rglob("*")):
            relative = path.relative_to(old)
            if not path.is_file() or (new / relative).exists():
                continue
            current = project / relative
            if current.is_file() and current.read_bytes() != path.read_bytes():
                differences.deleted_edits.append(relative)
        return differences


def _names(answers: dict[str, Any]) -> dict[str, Any]:
    """Return the answers that name the project and its package."""
    return {field: answers.get(field) for field in _NAME_FIELDS}


def _recorded_names(project: Path) -> dict[str, Any]:
    return _names(_recorded_answers(project))


def _recorded_answers(project: Path) -> dict[str, Any]:
    """Return the answers file of the project, or raise when it is unreadable."""
    path = project / ANSWERS_FILE
    try:
        recorded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        problem = str(exc).replace("\n", " ")
        raise GenerateError(
            f"cannot read {path}: {problem}; restore the file from the project's "
            "git history"
        ) from None
    return recorded if isinstance(recorded, dict) else {}


def _rename(
    clone: Path,
    subdirectory: Path,
    before: dict[str, Any],
    after: dict[str, Any],
    tag: str,
) -> list[str]:
    """Rename the project in the clone, carrying the user's edits along.

    Copier's update matches files by path, so a new name, which moves the
    package directory, would drop the edits of every moved file. So the
    update above kept the old name, and the rename is a cherry-pick of two
    renders that differ only in the name: git's merge follows the moved files
    and applies their renaming to the edited ones. Returns the paths of files
    that the user deleted and the rename would have changed; they stay
    deleted.
    """
    target = clone / subdirectory / "src" / after["package_name"]
    if target.exists():
        relative = (subdirectory / "src" / after["package_name"]).as_posix()
        raise UpdateConflictError(
            "the update was not applied, because the new name's package "
            f"directory {relative} exists already; move or remove it, commit, and "
            "run 'agogosml generate' again",
            [relative],
        )
    run_git(["add", "--all"], clone)
    run_git(
        ["commit", "--quiet", "--allow-empty", "-m", "Update the template"],
        clone,
        env=TEMPORARY_IDENTITY,
    )
    with tempfile.TemporaryDirectory(prefix="agogosml-rename-") as tmp:
        renders = Path(tmp)
        run_git(["init", "--quiet"], renders)
        bundle = clone / subdirectory / BUNDLE_PATH
        for answers in (before, after):
            for path in renders.iterdir():
                if path.name == ".git":
                    continue
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink()
            _render(renders / subdirectory, bundle, answers, tag)
            run_git(["add", "--all"], renders)
            message = f"Render {answers['project_name']}"
            run_git(
                ["commit", "--quiet", "-m", message], renders, env=TEMPORARY_IDENTITY
            )
        run_git(["fetch", "--quiet", str(renders), "HEAD"], clone)
    try:
        # A file the user added to the package moves with it, instead of
        # being reported as a conflict (git's default for directory renames).
        run_git(
            [
                "-c",
                "merge.directoryRenames=true",
                "cherry-pick",
                "--no-commit",
                "FETCH_HEAD",
            ],
            clone,
        )
    except GitError:
        pass  # The conflicts are named below.
    kept_deleted = _keep_deletions(clone)
    _raise_on_conflicts(clone)
    _move_leftovers(
        clone / subdirectory / "src",
        before["package_name"],
        after["package_name"],
    )
    return kept_deleted


def _keep_deletions(clone: Path) -> list[str]:
    """Keep the files that the user deleted and the rename changes deleted.

    Such a file conflicts in the cherry-pick (deleted by us, modified by them).
    Returns their paths, relative to the repository root.
    """
    status = run_git(["status", "--porcelain", "-z"], clone)
    deleted = [path for letters, path in _status_entries(status) if letters == "DU"]
    if deleted:
        run_git(["rm", "--quiet", "--", *deleted], clone)
    return deleted


def _move_leftovers(source_root: Path, old: str, new: str) -> None:
    """Move what git's merge left in the old package directory to the new one.

    Git moves the files added next to the moved ones, but not those in a
    subdirectory of their own, such as a subpackage the user added.
    """
    old_package = source_root / old
    if not old_package.is_dir():
        return
    leftovers = sorted(path for path in old_package.rglob("*") if path.is_file())
    for path in leftovers:
        target = source_root / new / path.relative_to(old_package)
        if target.exists():
            raise UpdateConflictError(
                "the update was not applied, because the rename of the package "
                f"would move {path.relative_to(source_root)} onto "
                f"{target.relative_to(source_root)}, which exists; move or remove "
                "one of them, commit, and run 'agogosml generate' again",
                [str(target.relative_to(source_root))],
            )
        target.parent.mkdir(parents=True, exist_ok=True)
        path.rename(target)
    shutil.rmtree(old_package)


def _repository_root(project: Path) -> Path:
    try:
        root = run_git(["rev-parse", "--show-toplevel"], project).strip()
    except GitError:
        raise GenerateError(
            f"{project} has {ANSWERS_FILE} but is not in a git repository, and "
            "Copier updates only git-tracked projects; run 'git init' and commit "
            "the project, then run 'agogosml generate' again"
        ) from None
    return Path(root).resolve()


def _check_clean(top: Path, project: Path, manifest_file: Path | None) -> None:
    """Raise `GenerateError` if the project has uncommitted or untracked files.

    The manifest may have uncommitted changes: they are the reason to update.
    """
    status = run_git(
        ["status", "--porcelain", "-z", "--untracked-files=all", "--", str(project)],
        top,
    )
    skipped = ""
    if manifest_file is not None and manifest_file.is_relative_to(top):
        skipped = manifest_file.relative_to(top).as_posix()
    entries = [entry for entry in _status_entries(status) if entry[1] != skipped]
    untracked = [path for letters, path in entries if letters == "??"]
    changed = [path for letters, path in entries if letters != "??"]
    problems = []
    if changed:
        problems.append(f"uncommitted changes ({_listing(changed)})")
    if untracked:
        problems.append(f"untracked files ({_listing(untracked)})")
    stash = "'git stash --include-untracked'"
    if any(letters in (" A", " R") for letters, _ in entries):
        # git stash cannot save a file marked with `git add --intent-to-add`,
        # as an update marks the files it adds; unmarked, it is untracked.
        reset = "git reset --quiet"
        if project != top:
            reset += f" -- {shlex.quote(str(project))}"
        stash = f"'{reset}' and then {stash}"
    if problems:
        raise GenerateError(
            f"the project has {' and '.join(problems)}; commit them, or set them "
            f"aside with {stash} (or add untracked files to .gitignore), then run "
            "'agogosml generate' again, so that the update can be reviewed on its "
            "own"
        )


def _listing(paths: list[str], limit: int = 10) -> str:
    """Return up to `limit` paths, comma-separated, with '...' when there are more."""
    return ", ".join(paths[:limit]) + (", ..." if len(paths) > limit else "")


def _status_entries(status: str) -> list[tuple[str, str]]:
    """Return the (status letters, path) pairs of ``git status --porcelain -z``.

    Each entry is two status letters, a space and the path. A rename or copy
    entry is followed by the original path, which is skipped. Either letter
    may say so: the second one does for a file that `git add --intent-to-add`
    marked, when git takes it for a renamed deleted file.
    """
    entries = status.split("\0")
    pairs = []
    index = 0
    while index < len(entries):
        entry = entries[index]
        index += 1
        if len(entry) < 4:
            continue
        pairs.append((entry[:2], entry[3:]))
        if "R" in entry[:2] or "C" in entry[:2]:
            index += 1
    return pairs


def _recorded_version(project: Path) -> Version:
    answers = _recorded_answers(project)
    source = answers.get("_src_path")
    if source != str(BUNDLE_PATH) or not (project / BUNDLE_PATH).is_file():
        raise GenerateError(
            f"{project / ANSWERS_FILE} does not name the template history "
            f"{BUNDLE_PATH}, or that file is missing; restore both from the "
            "project's git history"
        )
    if answers.get("_commit") is None:
        raise GenerateError(
            f"{project / ANSWERS_FILE} does not record the template version "
            "(_commit); restore the file from the project's git history"
        )
    try:
        return Version(str(answers.get("_commit")))
    except InvalidVersion:
        raise GenerateError(
            f"{project / ANSWERS_FILE} records the template version "
            f"{answers.get('_commit')!r}, which is not a version; restore the file "
            "from the project's git history"
        ) from None


def _record_template(work: Path, recorded: Version) -> str:
    """Add the packaged template to the clone's history, commit it, return its tag."""
    with TemplateHistory() as history:
        history.open(work / BUNDLE_PATH)
        tag, added = history.add_packaged_template()
        if Version(tag) < recorded:
            raise GenerateError(_older_template_error(recorded, Version(tag)))
        if not added:
            return tag
        history.write_bundle(work / BUNDLE_PATH)
    # Copier updates only a clean work tree, so the new history is committed in
    # the clone. Only the difference to the project's HEAD reaches the project.
    run_git(["add", "--", str(BUNDLE_PATH)], work)
    message = f"Record template {tag}"
    run_git(["commit", "--quiet", "-m", message], work, env=TEMPORARY_IDENTITY)
    return tag


def _older_template_error(recorded: Version, packaged: Version) -> str:
    """Return the error for a project generated from a newer template.

    A template version ``<version>.postN`` is a template change within one
    agogosml version, not a release, so the advice names the release.
    """
    problem = (
        f"the project was generated from template {recorded}, newer than this "
        f"agogosml's template {packaged}"
    )
    release = recorded.base_version
    if Version(release) > Version(packaged.base_version):
        return f"{problem}; install agogosml {release} or newer to update it"
    return (
        f"{problem}, a later template of agogosml {release}; install agogosml from "
        "the checkout or wheel that generated the project, or a newer release, to "
        "update it"
    )


def _raise_on_conflicts(clone: Path) -> None:
    unmerged = _lines(run_git(["diff", "--name-only", "--diff-filter=U"], clone))
    status = run_git(["status", "--porcelain", "-z", "--untracked-files=all"], clone)
    rejected = [
        path.removesuffix(".rej")
        for letters, path in _status_entries(status)
        if letters == "??" and path.endswith(".rej")
    ]
    conflicts = sorted(set(unmerged) | set(rejected))
    if conflicts:
        raise UpdateConflictError(
            "the update was not applied, because template changes overlap your "
            f"edits in: {', '.join(conflicts)}. Move your edits away from the "
            "generated lines, or undo them, commit, and run 'agogosml generate' "
            "again; then redo the edits",
            conflicts,
        )


def _staged_changes(
    clone: Path, subdirectory: Path, base: str
) -> tuple[list[Change], str]:
    """Stage everything in the clone; return the changed files and a binary patch.

    Both are relative to `base`, the project's HEAD commit. Renames are
    detected in both, whatever git's configuration says.
    """
    run_git(["add", "--all", "--", str(subdirectory)], clone)
    status = run_git(
        [
            "diff",
            "--cached",
            "--name-status",
            "-z",
            "--find-renames",
            base,
            "--",
            str(subdirectory),
        ],
        clone,
    )
    patch = run_git(
        [
            "diff",
            "--cached",
            "--binary",
            "--find-renames",
            base,
            "--",
            str(subdirectory),
        ],
        clone,
    )
    return _changes(status), patch


def _changes(status: str) -> list[Change]:
    """Return the changes that ``git diff --name-status -z`` lists.

    An entry is the status (a letter, and the similarity of a rename or a
    copy) and the path; a rename or a copy has the old path before the new.
    """
    fields = status.split("\0")
    changes = []
    index = 0
    while index < len(fields) and fields[index]:
        letter = fields[index][0]
        kind = _CHANGE_KINDS.get(letter, "changed")
        if letter in "RC":
            changes.append(Change(kind, fields[index + 2], fields[index + 1]))
            index += 3
        else:
            changes.append(Change(kind, fields[index + 1]))
            index += 2
    return changes


def _mark_added(top: Path, paths: list[str]) -> None:
    """Mark the files that an update added with ``git add --intent-to-add``.

    Their content stays unstaged for review, but ``git diff HEAD`` shows them
    and ``git commit -a`` commits them, as it does the modified files;
    untracked, both would leave them out. ``--force`` marks a file that only
    this repository's own ignore rules (.git/info/exclude) match too: the
    update, computed in a clone without those rules, added it to the project.
    """
    if paths:
        run_git(
            ["--literal-pathspecs", "add", "--intent-to-add", "--force", "--", *paths],
            top,
        )
