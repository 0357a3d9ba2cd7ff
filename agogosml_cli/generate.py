"""``agogosml generate``: render a pipeline project from a manifest, or update it.

`template_answers` turns the manifest into Copier answers, and
`agogosml_cli.project` renders or updates the project with them.
"""

from __future__ import annotations

import shlex
from pathlib import Path, PurePosixPath
from typing import Any

import click

from agogosml import __version__
from agogosml_cli.git import GitError
from agogosml_cli.manifest import (
    DEFAULT_MANIFEST_PATH,
    FileSink,
    FileSource,
    Manifest,
    ManifestError,
    load_manifest,
    package_name,
)
from agogosml_cli.project import Change, GenerateError, Outcome, generate_project
from agogosml_cli.wheel import WheelError, wheel_name


def template_answers(manifest: Manifest) -> dict[str, Any]:
    """Return the Copier answers of `manifest`.

    Everything the template needs is an answer, so Copier records it in the
    answers file and renders the old version of a project exactly when it
    updates it.
    """
    return {
        "project_name": manifest.name,
        "package_name": package_name(manifest.name),
        "app_template": manifest.app.template.value,
        "source": _endpoint_answer(manifest.source),
        "sink": _endpoint_answer(manifest.sink),
        "group_id": manifest.group_id() or "",
        "kafka": _chart_kafka(manifest),
        "registry": manifest.registry,
        "kubernetes_namespace": manifest.kubernetes.namespace,
        "agogosml_version": __version__,
        "agogosml_wheel": wheel_name(),
    }


def _endpoint_answer(endpoint: Any) -> dict[str, Any]:
    data: dict[str, Any] = endpoint.model_dump(mode="json", exclude_none=True)
    return {"type": data.pop("type"), **data}


def _chart_kafka(manifest: Manifest) -> dict[str, Any] | None:
    """Return the Kafka connection that the chart gives the reader and the writer.

    The manifest requires source and sink to share it, so the source's is
    taken. None means an endpoint is a file, which the chart cannot run.
    """
    source = manifest.source
    if isinstance(source, FileSource) or isinstance(manifest.sink, FileSink):
        return None
    data = _endpoint_answer(source)
    connection: dict[str, Any] = {"bootstrap_servers": source.bootstrap()}
    for name in ("security_protocol", "sasl", "ca_certificate", "connection_string"):
        if name in data:
            connection[name] = data[name]
    return connection


# ---------------------------------------------------------------------------
# Command
# ---------------------------------------------------------------------------


@click.command()
@click.option(
    "--manifest",
    "manifest_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=DEFAULT_MANIFEST_PATH,
    show_default=True,
    help="Pipeline manifest to render, as written by 'agogosml init'.",
)
@click.option(
    "--output",
    type=click.Path(file_okay=False, path_type=Path),
    metavar="DIR",
    help="Project directory. Default: the directory that contains the manifest.",
)
@click.option(
    "--commit-to-enclosing-repository",
    is_flag=True,
    help="At the first run, commit the project into the git repository that "
    "contains the project directory, when that directory is not the "
    "repository's root. Without it, generate stops before writing anything.",
)
def generate(
    manifest_path: Path, output: Path | None, commit_to_enclosing_repository: bool
) -> None:
    """Render a pipeline project from a manifest, or update the one rendered there.

    \b
    First run (the directory is new, empty, or contains only the manifest):
    Copier renders the model app with its tests, Dockerfile,
    docker-compose.yml, Azure Pipelines CI, README and pyproject.toml, and,
    when neither source nor sink is a file, Helm values and the CD pipeline. Then
    generate runs 'git init' unless the directory is in a git repository, and
    commits the render, which updates need. A directory inside a repository
    that it is not the root of needs --commit-to-enclosing-repository (or a
    'git init' of its own) first. If git ignores the directory, or rendered
    files, there, generate writes nothing and names the ignore rule.

    \b
    Later runs (the directory has .copier-answers.yml): update the project to
    the manifest's values and to this agogosml's template with Copier's update,
    keeping your edits. The project must have no uncommitted changes and no
    untracked files other than the manifest. The changes are left uncommitted
    for review; files that the update adds are marked with 'git add
    --intent-to-add', so that 'git diff HEAD' shows them and 'git commit -a'
    commits them. If a template change overlaps an edit of yours in the same
    lines, nothing is changed and the command exits with status 1, naming the
    files. A new project name moves the package: reinstall the project
    (pip install -e '.[test]') so that its entry point follows. An update
    that replaces the agogosml wheel in wheels/ prints the command that
    installs it.
    """  # noqa: D301 - click reads the \b lines as "do not rewrap this paragraph"
    try:
        manifest = load_manifest(manifest_path)
    except ManifestError as exc:
        raise click.ClickException(str(exc)) from None
    project = output if output is not None else manifest_path.parent
    try:
        outcome = generate_project(
            template_answers(manifest),
            project,
            manifest_path=manifest_path,
            commit_to_enclosing_repository=commit_to_enclosing_repository,
        )
    except (GenerateError, GitError, WheelError) as exc:
        raise click.ClickException(str(exc)) from None
    _report(outcome, project, manifest_path)


def _report(outcome: Outcome, project: Path, manifest_path: Path) -> None:
    if outcome.created:
        click.echo(
            f"Rendered {len(outcome.changed)} files into {project} from template "
            f"{outcome.template_version} and committed them ({outcome.commit})."
        )
        repository = outcome.repository
        if repository is not None and repository != project.resolve():
            click.echo(
                f"The commit is in the git repository at {repository}, which "
                f"contains {project.resolve()}."
            )
        if outcome.identity_fallback:
            click.echo(
                "git has no user name and email here, so the commit's author is "
                "agogosml <agogosml@localhost>; set user.name and user.email to "
                "commit as yourself."
            )
        return
    if not outcome.changed:
        click.echo(f"{project} is up to date with template {outcome.template_version}.")
    else:
        _echo_paths(
            f"Updated {project} to template {outcome.template_version}:",
            _change_lines(outcome.changed),
            _review_advice(outcome, project),
        )
    if outcome.deleted_edits:
        _echo_paths(
            "The manifest no longer generates these files, so the update deletes "
            "them, with the edits you made to them:",
            outcome.deleted_edits,
            "'git show HEAD:PATH' shows your version of each.",
        )
    _echo_reinstall(outcome)
    if outcome.not_applied:
        manifest = shlex.quote(str(manifest_path))
        _echo_paths(
            "The template or the manifest changed these generated files, which "
            "the project no longer has (deleted or renamed), so they were not "
            "updated:",
            outcome.not_applied,
            "To see them as generated now, render the manifest into a new "
            f"directory: agogosml generate --manifest {manifest} --output DIR",
        )


def _echo_reinstall(outcome: Outcome) -> None:
    """Print how to reinstall after an update that moved the package or the wheel."""
    wheel = f"wheels/{wheel_name()}"
    new_wheel = any(
        PurePosixPath(change.path).parts[-2:] == ("wheels", wheel_name())
        and change.kind != "deleted"
        for change in outcome.changed
    )

    commands = []
    if outcome.renamed and outcome.previous_name:
        commands.append(
            f".venv/bin/python -m pip uninstall --yes {outcome.previous_name}"
        )
    if new_wheel:
        # pip keeps an installed version that the requirement allows, and the
        # new wheel has the same version number, so only a forced install
        # replaces the code.
        commands.append(
            f".venv/bin/python -m pip install --force-reinstall --no-deps {wheel}"
        )
    if not (outcome.renamed or commands):
        return
    commands.append(".venv/bin/python -m pip install --find-links wheels -e '.[test]'")

    reasons = []
    if outcome.renamed:
        reasons.append(
            "The package moved with the new name: reinstall the project "
            "(pip install -e '.[test]') in its environment, so that its command "
            "is installed under the new name and the old one is gone."
        )
    if new_wheel:
        reasons.append(
            f"The update replaced {wheel} with the agogosml that ran it: "
            "install it into the project's environment, which keeps the old one."
        )
    click.echo(" ".join(reasons) + " Run: " + " && ".join(commands))


def _change_lines(changes: list[Change]) -> list[str]:
    """Return a line per changed file: what happened to it, and its path."""
    width = max(len(change.kind) for change in changes)
    lines = []
    for change in changes:
        line = f"{change.kind:<{width}}  {change.path}"
        if change.source is not None:
            line += f" (from {change.source})"
        lines.append(line)
    return lines


def _review_advice(outcome: Outcome, project: Path) -> str:
    """Return the commands that show the update's changes and commit them.

    Files that the update added are marked with ``git add --intent-to-add``,
    so both commands include them. In a project that is a subdirectory of its
    repository, the commands name the project, so that they leave the rest of
    the repository alone. ``git -C`` makes them work from any directory.
    """
    resolved = project.resolve()
    git = (
        "git"
        if resolved == Path.cwd().resolve()
        else f"git -C {shlex.quote(str(project))}"
    )
    if outcome.repository is None or outcome.repository == resolved:
        advice = (
            f"Review the changes with '{git} diff HEAD' and commit them with "
            f"'{git} commit -a'."
        )
    else:
        advice = (
            f"Review the changes with '{git} diff HEAD -- .' and commit them with "
            f"'{git} commit -- .', which leave the rest of the repository at "
            f"{outcome.repository} alone."
        )
    if any(change.added for change in outcome.changed):
        advice += (
            " The files that the update added are marked with 'git add "
            "--intent-to-add', so both commands include them."
        )
    return advice


def _echo_paths(heading: str, paths: list[str], closing: str) -> None:
    """Print a heading, the paths indented below it, and a closing line."""
    click.echo(heading)
    for path in paths:
        click.echo(f"  {path}")
    click.echo(closing)
