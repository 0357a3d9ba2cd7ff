"""Checks of the options of ``agogosml run`` that choose the model app and its input.

By default a run streams the fraud dataset through agogosml's sample app.
``--app MODULE`` (or ``--project DIR``, which names the app of a generated
project) runs another app with ``python -m``, and ``--input FILE`` streams a
JSON Lines file in place of the dataset.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import click

from agogosml import exact_json
from agogosml_cli.run import UTF8_BOM, AppChoice

#: The manifest file of a generated project, in its top directory.
MANIFEST_NAME = "agogosml.yaml"
#: The position at the end of a JSON decoder's error, such as orjson's
#: ": line 1 column 5 (char 4)".
_LINE_POSITION = re.compile(r": line \d+ column (\d+) \(char \d+\)")

#: Run by the interpreter of the run in the app's directory, as ``python -m``
#: would run the module there: exits 0 when the module is found, else with
#: the reason. It imports no package of the app.
_FIND_MODULE = """\
import importlib.machinery, importlib.util, sys
parts = sys.argv[1].split(".")
try:
    spec = importlib.util.find_spec(parts[0])
except Exception as exc:
    sys.exit(f"finding it failed: {type(exc).__name__}: {exc}")
# Each package's directory is searched without importing the package, so no
# code of the app runs here.
for part in parts[1:]:
    locations = spec.submodule_search_locations if spec is not None else None
    spec = importlib.machinery.PathFinder.find_spec(part, list(locations or []))
if spec is None:
    sys.exit("no module of that name was found")
if spec.origin in ("built-in", "frozen"):
    sys.exit("it is a module of Python itself, not an app")
locations = spec.submodule_search_locations
if locations is not None and importlib.machinery.PathFinder.find_spec(
    "__main__", list(locations)
) is None:
    sys.exit("it is a package without a __main__ module; name its app module")
"""


@dataclass(frozen=True)
class AppOptions:
    """Values of the app and input options, as click passes them."""

    app: str | None = None
    project: Path | None = None
    input_file: Path | None = None
    data: Path | None = None
    model: Path | None = None


def resolve_app(options: AppOptions) -> AppChoice:
    """Check the option combination and return the app of the run.

    Raises:
        click.UsageError: when options conflict, the manifest of --project is
            invalid, or the app module cannot be found.
        click.BadParameter: when --input is not a JSON Lines file.
    """
    _check_combination(options)
    if options.input_file is not None:
        check_input_file(options.input_file)
    if options.project is not None:
        directory = options.project.resolve()
        choice = AppChoice(project_app_module(directory), directory)
        _check_importable(choice, "--project", str(options.project))
        return choice
    if options.app is not None:
        choice = AppChoice(options.app)
        _check_importable(choice, "--app", options.app)
        return choice
    return AppChoice()


def _check_combination(options: AppOptions) -> None:
    if options.app is not None and options.project is not None:
        raise click.UsageError(
            "--app and --project exclude each other: --project runs the app "
            "module of the project. Use one"
        )
    if options.input_file is not None and options.data is not None:
        raise click.UsageError(
            "--input and --data exclude each other: both name the records to "
            "stream. Use --input for a JSON Lines file, --data for a dataset CSV"
        )
    option = "--app" if options.app is not None else "--project"
    if options.app is None and options.project is None:
        return
    if options.model is not None:
        raise click.UsageError(
            f"--model sets the model file of the sample app, not of the app of "
            f"{option}; leave it out and configure your app through its "
            "environment variables"
        )
    if options.data is not None:
        raise click.UsageError(
            f"--data is the fraud dataset of the sample app; give the input of "
            f"the app of {option} with --input FILE"
        )
    if options.input_file is None:
        raise click.UsageError(
            f"{option} needs --input FILE: a JSON Lines file of the values that "
            "the app scores, one JSON value a line"
            + _manifest_input_hint(options.project)
        )
    if options.app is not None:
        _check_module_name(options.app)


def _manifest_input_hint(project: Path | None) -> str:
    """Return a hint naming the source file of the project's manifest, or ''.

    A run reads only --input, so this is a suggestion, not a default.
    """
    from agogosml_cli.manifest import FileSource, ManifestError, load_manifest

    if project is None:
        return ""
    try:
        manifest = load_manifest(project / MANIFEST_NAME)
    except ManifestError:
        # The check of --project names the problem of the manifest.
        return ""
    if not isinstance(manifest.source, FileSource):
        return ""
    path = project / manifest.source.path
    return (
        ", such as the source file of the project's manifest: --input "
        f"{shlex.quote(str(path))}"
    )


def _check_module_name(module: str) -> None:
    if module.endswith(".py"):
        _check_not_file_name(module)
    if not all(part.isidentifier() for part in module.split(".")):
        raise click.BadParameter(
            f"{module!r} is not a Python module name; give a dotted name such "
            "as 'my_project.app', which the run starts as 'python -m "
            "my_project.app'",
            param_hint="--app",
        )


def _check_not_file_name(module: str) -> None:
    """Raise a usage error naming the module of `module`, a file name or path."""
    stem = module[:-3]
    if stem.isidentifier():
        raise click.BadParameter(
            f"{module!r} is a file name; give the module name, as in --app "
            f"{stem}, and run agogosml in the directory that contains {module}",
            param_hint="--app",
        )
    if all(part.isidentifier() for part in stem.split(".")):
        raise click.BadParameter(
            f"{module!r} ends in .py; give the module name without it, as in "
            f"--app {stem}",
            param_hint="--app",
        )
    path = Path(module)
    if path.stem.isidentifier():
        raise click.BadParameter(
            f"{module!r} is a file path; give the module name, as in --app "
            f"{path.stem}, and run agogosml in the directory that contains "
            f"{path.name} ({str(path.parent)!r}). For the app of a generated "
            "project, give --project DIR instead",
            param_hint="--app",
        )


def project_app_module(project: Path) -> str:
    """Return the app module of the generated project in `project`.

    The module is ``<package>.app``, where the package is the project name of
    the manifest with '_' for '-'.

    Raises:
        click.UsageError: naming the manifest, when it is missing or invalid.
    """
    from agogosml_cli.manifest import ManifestError, load_manifest, package_name

    path = project / MANIFEST_NAME
    if not path.is_file():
        raise click.UsageError(
            f"--project {str(project)!r} has no {MANIFEST_NAME}; give the top "
            "directory of a project that 'agogosml generate' made, or name the "
            "app module with --app"
        )
    try:
        manifest = load_manifest(path)
    except ManifestError as exc:
        raise click.UsageError(f"--project {str(project)!r}: {exc}") from None
    return f"{package_name(manifest.name)}.app"


def _check_importable(choice: AppChoice, option: str, value: str) -> None:
    """Raise a usage error unless ``python -m`` can find the app's module.

    The check runs in a child process of the run's interpreter in the app's
    directory, as the app will, so it imports no code of the app here.
    """
    try:
        found = subprocess.run(
            [sys.executable, "-c", _FIND_MODULE, choice.module],
            cwd=choice.directory,
            capture_output=True,
            text=True,
            timeout=60,
        )
    except subprocess.TimeoutExpired:
        raise click.UsageError(
            f"{option} {value!r}: looking up 'python -m {choice.module}' took "
            "over 60 s; check the environment's packages"
        ) from None
    if found.returncode == 0:
        return
    reason = found.stderr.strip().splitlines()[-1:] or ["it was not found"]
    if option == "--project":
        fix = _project_install_hint(value)
    else:
        fix = (
            "For a module file, run agogosml in the directory that contains it. "
            "Otherwise install the package of the app into this environment (for "
            "a generated project, 'pip install -e PROJECT_DIR'), or run the "
            "agogosml of the environment that has it"
        )
    raise click.UsageError(
        f"{option} {value!r}: the interpreter of this run ({sys.executable}) "
        f"cannot run 'python -m {choice.module}': {reason[0]}. {fix}"
    )


def _project_install_hint(project: str) -> str:
    """Return how to run a project whose package this environment lacks.

    A generated project's README installs it into its own ``.venv``, together
    with the ``agogosml`` command, so that command is the usual fix.
    """
    own_command = Path(project) / ".venv" / "bin" / "agogosml"
    if own_command.is_file():
        return (
            f"Run the agogosml of the project's environment, {own_command}, or "
            f"install the project into this environment ('pip install -e "
            f"{project}')"
        )
    return (
        "Install the project into an environment as its README says, and run "
        "the agogosml of that environment, or install the project into this "
        f"environment ('pip install -e {project}')"
    )


def _column_in_file(error: str, indent: int) -> str:
    """Replace the decoder's position in `error` with the column in the file.

    The decoder got one line without its leading whitespace, which is `indent`
    characters long, so its line is always 1 and its column is short by
    `indent`.
    """
    match = _LINE_POSITION.search(error)
    if match is None:
        return error
    column = int(match.group(1)) + indent
    return f"{error[: match.start()]} at column {column}{error[match.end() :]}"


_SHOWN_INVALID_LINES = 5


def _more_invalid_lines(numbers: list[int], count: int) -> str:
    """Name the invalid lines after the first, so that one edit fixes them all.

    `numbers` are the first of them, and `count` is how many there are.
    """
    if not count:
        return ""
    shown = ", ".join(str(number) for number in numbers[:_SHOWN_INVALID_LINES])
    if count > _SHOWN_INVALID_LINES:
        shown += ", ..."
    noun = "line is" if count == 1 else "lines are"
    return f", and {count:,} more {noun} not either ({shown})"


#: The fix for a file that contains one JSON document over several lines, such as
#: a pretty-printed array.
_MULTI_LINE_HINT = (
    "the file looks like one JSON document over several lines, but each line "
    "must hold a whole value: put each value, such as each element of an "
    "array, on a line of its own"
)


def _opens_document(line: bytes, error: str) -> bool:
    """Tell whether `line` opens an array or object that goes on past its end."""
    return line[:1] in (b"[", b"{") and error.startswith("unexpected end of data")


def check_input_file(path: Path) -> None:
    """Check that `path` is a JSON Lines file with at least one value.

    Blank lines are allowed, as the input reader skips them.

    Raises:
        click.BadParameter: naming --input, the line and why it is invalid.
    """
    if path.exists() and not path.is_file():
        raise click.BadParameter(
            f"{str(path)!r} is not a regular file: the run reads its input twice, "
            "to check it and to stream it, and a pipe or a device gives its data "
            "only once. Write the records to a file and give that",
            param_hint="--input",
        )
    records = 0
    first_error = ""
    # The first invalid lines, and the count of all: a large file given by
    # mistake may have millions.
    invalid_lines: list[int] = []
    invalid_count = 0
    try:
        with path.open("rb") as file:
            for number, raw in enumerate(file, start=1):
                text = raw.removeprefix(UTF8_BOM)
                line = text.strip()
                if not line:
                    continue
                error = exact_json.json_error(line)
                if error:
                    if not invalid_lines:
                        indent = len(text) - len(text.lstrip())
                        first_error = _column_in_file(error, indent)
                        if not records and _opens_document(line, error):
                            first_error += f"; {_MULTI_LINE_HINT}"
                    if len(invalid_lines) <= _SHOWN_INVALID_LINES:
                        invalid_lines.append(number)
                    invalid_count += 1
                    continue
                records += 1
    except OSError as exc:
        raise click.BadParameter(
            f"cannot read {str(path)!r}: {exc.strerror or exc}", param_hint="--input"
        ) from None
    if invalid_lines:
        raise click.BadParameter(
            f"{str(path)!r} is not JSON Lines: line {invalid_lines[0]} is not a "
            f"JSON value ({first_error})"
            f"{_more_invalid_lines(invalid_lines[1:], invalid_count - 1)}. "
            "Give a file with one JSON value a line",
            param_hint="--input",
        )
    if records == 0:
        raise click.BadParameter(
            f"{str(path)!r} has no records; give a file with one JSON value a line",
            param_hint="--input",
        )
