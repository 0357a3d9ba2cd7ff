"""``agogosml init``: write a pipeline manifest from flags and prompts."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from agogosml_cli.init_fields import (
    FIELDS,
    FLAGS,
    Data,
    InitField,
    get_value,
    put_value,
    suggest_name,
)
from agogosml_cli.manifest import (
    DEFAULT_MANIFEST_PATH,
    EndpointType,
    ManifestError,
    SecretRef,
    dump_manifest,
    manifest_json_schema,
    validate_manifest,
)


def collect_manifest_data(
    values: dict[str, Any],
    *,
    interactive: bool,
    suggestions: dict[str, Any] | None = None,
) -> Data:
    """Return manifest data from flag values, defaults and (if `interactive`) prompts.

    Fields are handled in the order of `FIELDS`, so a type is known before the
    fields that depend on it, and flag values are converted in that order too:
    a flag that does not fit the chosen types is reported as such, not as an
    invalid value. `suggestions` gives prompt defaults by parameter name, in
    place of the fields' own.

    Raises:
        click.BadParameter: A flag value is invalid.
        click.UsageError: A flag does not apply to the chosen types, the source
            and sink types conflict, or (without prompts) required fields are
            missing; the message lists their flags.
    """
    data: Data = {}
    missing: list[InitField] = []
    for field in FIELDS:
        flag_value = values.get(field.dest)
        if not field.applies(data):
            # A flag may apply to the type that its --source or --sink would
            # have set, so a missing type is reported in place of the flag.
            if flag_value is not None and not _type_missing(field, missing):
                raise click.UsageError(_inapplicable_message(field))
            continue
        if flag_value is not None:
            value = _flag_value(field, flag_value, data)
        else:
            value = _default_or_prompt(field, data, interactive, suggestions or {})
        if value is None:
            if field.required:
                missing.append(field)
            continue
        put_value(data, field.path, value)
    # A field that would copy a missing field is not listed: the flag of the
    # missing field sets both.
    missing = [field for field in missing if not _copies_missing(field, missing, data)]
    if missing:
        listed = ", ".join(f"{'.'.join(f.path)} ({f.flag})" for f in missing)
        raise click.UsageError(
            f"missing required fields: {listed}; pass them as flags, or run without "
            f"--no-input to be prompted.{_choices_note(missing)}"
        )
    return data


def _copies_missing(field: InitField, missing: list[InitField], data: Data) -> bool:
    """Return whether `field` defaults to the value of a field that is missing.

    That is its `default_from` field, and for the sink's connection settings
    the source's, when both are of one type.
    """
    if field.default_from is not None:
        return any(other.path == field.default_from for other in missing)
    if field.path[0] != "sink" or field.default is None:
        return False
    if get_value(data, ("source", "type")) != get_value(data, ("sink", "type")):
        return False
    source_path = ("source", *field.path[1:])
    return any(other.path == source_path for other in missing)


def _type_missing(field: InitField, missing: list[InitField]) -> bool:
    """Return whether the type of the source or sink of `field` is missing."""
    return any(other.path == (field.path[0], "type") for other in missing)


def _choices_note(fields: list[InitField]) -> str:
    """Return sentences on the values of the flags that take a choice, or ""."""
    flags_by_choices: dict[tuple[str, ...], list[str]] = {}
    for field in fields:
        if isinstance(field.type, click.Choice):
            choices = tuple(str(choice) for choice in field.type.choices)
            flags_by_choices.setdefault(choices, []).append(field.flag)
    sentences = []
    for choices, flags in flags_by_choices.items():
        verb = "take" if len(flags) > 1 else "takes"
        values = choices[-1]
        if len(choices) > 1:
            values = f"{', '.join(choices[:-1])} or {values}"
        sentences.append(f" {' and '.join(flags)} {verb} {values}.")
    return "".join(sentences)


def _flag_value(field: InitField, value: Any, data: Data) -> Any:
    """Convert a flag's value with the field's type and check it against `data`."""
    ctx = click.get_current_context(silent=True)
    param = None
    if ctx is not None:
        param = next((p for p in ctx.command.params if p.name == field.dest), None)
    converted = field.type.convert(value, param, ctx)
    problem = field.check(data, converted) if field.check is not None else None
    if problem is not None:
        raise click.UsageError(f"{field.flag} {value}: {problem}")
    return converted


def _default_or_prompt(
    field: InitField, data: Data, interactive: bool, suggestions: dict[str, Any]
) -> Any:
    default = field.default(data) if field.default is not None else None
    confirm = field.confirm(data) if callable(field.confirm) else field.confirm
    if interactive and confirm:
        return _prompt(field, default, data)
    if default is not None or not (interactive and field.ask):
        return default
    suggestion = suggestions.get(field.dest)
    if suggestion is None and field.suggestion is not None:
        suggestion = field.suggestion(data)
    return _prompt(field, suggestion, data)


def _prompt(field: InitField, suggestion: Any, data: Data) -> Any:
    """Prompt until the input passes the field's type and its check against `data`.

    Input that is not a terminal and ends before the prompt is answered (click
    aborts then) gets an error that names the field and its flag.
    """
    try:
        return _prompt_until_valid(field, suggestion, data)
    except click.Abort:
        if sys.stdin.isatty():
            raise
        raise click.UsageError(
            f"the input ended before the prompt '{field.prompt}' was answered; "
            f"give one answer per prompt, or set the field with {field.flag}"
        ) from None


def _prompt_until_valid(field: InitField, suggestion: Any, data: Data) -> Any:
    while True:
        if suggestion is None:
            value = _prompt_without_default(field)
            if value is None:
                continue
        else:
            value = click.prompt(
                field.prompt,
                type=field.type,
                default=suggestion,
                show_choices=isinstance(field.type, click.Choice),
            )
        problem = field.check(data, value) if field.check is not None else None
        if problem is None:
            return value
        click.echo(f"Error: {problem}", err=True)


def _prompt_without_default(field: InitField) -> Any:
    """Prompt once for a field without a default; return None after an error.

    click repeats such a prompt silently after an empty answer, so the empty
    answer is taken here and reported.
    """
    text = field.prompt
    if isinstance(field.type, click.Choice):
        text += f" ({', '.join(str(choice) for choice in field.type.choices)})"
    answer = click.prompt(text, default="", show_default=False)
    if not answer.strip():
        name = ".".join(field.path)
        click.echo(f"Error: {name} is required; enter a value", err=True)
        return None
    try:
        return field.type.convert(answer, None, None)
    except click.BadParameter as exc:
        click.echo(f"Error: {exc.message}", err=True)
        return None


def _inapplicable_message(field: InitField) -> str:
    side = field.path[0]
    if field.path[-1] in ("mechanism", "username", "password"):
        return (
            f"{field.flag} applies only to a Kafka {side} with security protocol "
            f"SASL_PLAINTEXT or SASL_SSL; add --{side}-security-protocol SASL_SSL, "
            "or remove it"
        )
    kinds = [
        kind.value
        for kind in EndpointType
        if field.applies({side: {"type": kind.value}})
    ]
    return f"{field.flag} applies only to a {' or '.join(kinds)} {side}; remove it"


def _field_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Add a flag per field.

    Only choices are converted while click parses the flags.
    `collect_manifest_data` converts the other values in field order.
    """
    for field in reversed(FIELDS):
        if isinstance(field.type, click.Choice):
            option = click.option(
                field.flag, field.dest, type=field.type, help=field.help
            )
        else:
            option = click.option(
                field.flag,
                field.dest,
                type=click.STRING,
                metavar=field.metavar or field.type.name.upper(),
                help=field.help,
            )
        command = option(command)
    return command


def _print_schema(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        click.echo(manifest_json_schema(), nl=False)
        ctx.exit()


@click.command()
@click.option(
    "--manifest",
    "manifest_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=DEFAULT_MANIFEST_PATH,
    show_default=True,
    help="File to write the manifest to.",
)
@click.option("--force", is_flag=True, help="Overwrite an existing manifest.")
@click.option(
    "--no-input",
    is_flag=True,
    help="Never prompt; fail with the list of required fields that no flag sets.",
)
@click.option(
    "--print-schema",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_print_schema,
    help="Print the manifest's JSON Schema and exit.",
)
@_field_options
def init(manifest_path: Path, force: bool, no_input: bool, **values: Any) -> None:
    """Write a pipeline manifest (agogosml.yaml) for 'agogosml generate'.

    Every field can be set by a flag. Fields that no flag sets are prompted for,
    with defaults in brackets, unless --no-input is given. Secrets are never
    written: flags such as --source-connection-secret take SECRET:KEY, the name
    of a Kubernetes Secret and a key in it.
    """
    if manifest_path.is_dir():
        # click's dir_okay=False check passes an empty path, which means ".".
        raise click.BadParameter(
            f"{str(manifest_path)!r} is a directory; give the manifest's file "
            f"path, such as {str(manifest_path / DEFAULT_MANIFEST_PATH)!r}",
            param_hint="--manifest",
        )
    if manifest_path.exists() and not force:
        raise click.ClickException(
            f"{manifest_path} exists; edit it and run 'agogosml generate', or pass "
            "--force to overwrite it"
        )
    data = collect_manifest_data(
        values,
        interactive=not no_input,
        suggestions={"name": suggest_name(manifest_path.parent)},
    )
    data = _serializable(data)
    try:
        manifest = validate_manifest(data, "the manifest", FLAGS)
    except ManifestError as exc:
        raise click.ClickException(str(exc)) from None
    _write_manifest(manifest_path, dump_manifest(manifest))
    click.echo(
        f"Wrote {manifest_path}. Next: 'agogosml generate --manifest "
        f"{manifest_path}' renders the project."
    )


def _write_manifest(path: Path, text: str) -> None:
    """Write the manifest, creating its directory (and saying so) if it is missing.

    Raises:
        click.ClickException: The directory or the file cannot be created.
    """
    directory = path.parent
    if not directory.is_dir():
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            # The name may be taken by a file or by a symbolic link loop.
            fix = (
                "choose another --manifest path"
                if os.path.lexists(directory)
                else "create it or choose another --manifest path"
            )
            raise click.ClickException(
                f"cannot create directory {str(directory)!r} for the manifest: "
                f"{exc.strerror or exc}; {fix}"
            ) from None
        click.echo(f"Created directory {directory}.")
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise click.ClickException(
            f"cannot write the manifest to {str(path)!r}: {exc.strerror or exc}; "
            "choose another --manifest path"
        ) from None


def _serializable(data: Any) -> Any:
    """Replace `SecretRef` values by mappings, as the YAML manifest has them."""
    if isinstance(data, SecretRef):
        return data.model_dump()
    if isinstance(data, dict):
        return {key: _serializable(value) for key, value in data.items()}
    return data
