"""The ``agogosml`` command."""

from __future__ import annotations

import functools
import math
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich.console import Console

from agogosml import AgogosmlError, __version__
from agogosml_cli.container_commands import COMMANDS as CONTAINER_COMMANDS
from agogosml_cli.generate import generate
from agogosml_cli.init import init
from agogosml_cli.release import COMMANDS as RELEASE_COMMANDS
from agogosml_cli.release_status import status
from agogosml_cli.run_options import (
    StreamOptions,
    check_kafka_option,
    resolve_stream,
    stream_options,
)
from agogosml_cli.run_paths import DirectoryPath, FilePath
from sample_app import missing_packages_message

if TYPE_CHECKING:
    from agogosml_cli.run import AppChoice, RunOptions


def _finite(value: float, param: click.Parameter) -> float:
    """Return `value`, rejecting NaN, which range checks let through, and infinity."""
    if not math.isfinite(value):
        raise click.BadParameter(
            f"{value} is not a number of seconds; give a finite number such as 120",
            param=param,
        )
    return value


#: Exit code of a command ended by Ctrl-C: 128 + SIGINT, as shells report it.
INTERRUPTED_EXIT_CODE = 128 + signal.SIGINT


class _CommandGroup(click.Group):
    """A command group that lists each command with the whole first line of its help.

    click cuts the line mid-phrase to fit the terminal. Here it wraps instead.
    """

    def invoke(self, ctx: click.Context) -> Any:
        """Run the command; exit with 130 on a Ctrl-C that the command did not handle.

        click reports a KeyboardInterrupt as "Aborted!" with exit code 1. A
        shell reports a process ended by SIGINT as 128 + 2, which is what
        `agogosml run` exits with once its own handler is in place.
        """
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            click.echo("\nInterrupted by SIGINT.", err=True)
            ctx.exit(INTERRUPTED_EXIT_CODE)

    def format_commands(
        self, ctx: click.Context, formatter: click.HelpFormatter
    ) -> None:
        rows = []
        for name in self.list_commands(ctx):
            command = self.get_command(ctx, name)
            if command is not None and not command.hidden:
                rows.append((name, command.get_short_help_str(limit=200)))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


@click.group(cls=_CommandGroup)
@click.version_option(__version__, prog_name="agogosml")
def cli() -> None:
    """Put a machine-learning model on a data stream."""


@cli.command()
@click.option(
    "--kafka",
    "kafka",
    metavar="HOST:PORT",
    callback=check_kafka_option,
    help="Stream through Kafka topics on these brokers (host:port, or a "
    "comma-separated list) instead of files.",
)
@stream_options
@click.option(
    "--limit", type=click.IntRange(min=1), help="Stream only the first N records."
)
@click.option(
    "--summary-json",
    type=FilePath(dir_okay=False, path_type=Path),
    help="Also write the summary as JSON to this file.",
)
@click.option(
    "--app",
    "app_module",
    metavar="MODULE",
    help="Run this model app, 'python -m MODULE' with the interpreter of "
    "agogosml, in place of the sample fraud app. The module serves a ModelApp; "
    "needs --input.",
)
@click.option(
    "--project",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Run the app of the generated project in this directory: the module "
    "<package>.app, where agogosml.yaml names the package, started in the "
    "directory. Needs --input.",
)
@click.option(
    "--input",
    "input_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Stream this JSON Lines file, one JSON value a line, in place of the "
    "fraud dataset.",
)
@click.option(
    "--data",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Dataset CSV. Default: the cached ULB credit-card fraud dataset, fetched "
    "on first use.",
)
@click.option(
    "--model",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Model file of the sample app. Default: the one 'python -m "
    "sample_app.train' saves.",
)
@click.option(
    "--work-dir",
    type=DirectoryPath(file_okay=False, path_type=Path),
    default=Path(".agogosml/run"),
    show_default=True,
    help="Directory for the input, output, dead-letter and log files. A run "
    "locks it, so two runs cannot share it.",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=100,
    show_default=True,
    envvar="READER_BATCH_MAX_MESSAGES",
    show_envvar=True,
    help="Messages per request to the app (1 sends one message per request).",
)
@click.option(
    "--ordering",
    type=click.Choice(["partition", "key", "unordered"], case_sensitive=False),
    default="partition",
    show_default=True,
    envvar="READER_ORDERING",
    show_envvar=True,
    help="Ordering mode of the input reader.",
)
@click.option(
    "--key-field",
    default="transaction_id",
    show_default=True,
    metavar="NAME",
    help="With --kafka, the key of each input record: the text of this field of "
    "a JSON object line; other lines get no key.",
)
@click.option(
    "--max-dead-letters",
    type=click.IntRange(min=0),
    metavar="N",
    help="Exit with code 1 when more than N records were dead-lettered, as a "
    "check in CI. Default: no limit.",
)
@click.option(
    "--stall-timeout-seconds",
    type=click.FloatRange(min=1),
    callback=lambda ctx, param, value: _finite(value, param),
    default=120.0,
    show_default=True,
    help="Give up when no record finishes for this many seconds.",
)
def run(
    kafka: str | None,
    limit: int | None,
    summary_json: Path | None,
    app_module: str | None,
    project: Path | None,
    input_file: Path | None,
    data: Path | None,
    model: Path | None,
    work_dir: Path,
    batch_size: int,
    ordering: str,
    key_field: str,
    max_dead_letters: int | None,
    stall_timeout_seconds: float,
    **stream: Any,
) -> None:
    """Stream records through input reader, model app and output writer.

    Starts the three services as local processes on loopback, streams the
    records through them and prints a summary. By default the app is
    agogosml's sample fraud app and the records are the fraud dataset; --app
    or --project runs your app, and --input streams your JSON Lines file.

    \b
    Exit codes:
      0    every record was written or dead-lettered
      1    a failure, a service that exited during the run, a record that
           is in neither the output nor the dead letters, or more dead
           letters than --max-dead-letters
      2    a usage error, such as an invalid option value, or a missing
           sample extra, trained model or app module, found before any
           service starts
      130  interrupted by Ctrl-C (SIGINT); the services are stopped first
      143  stopped by SIGTERM; the services are stopped first
    """  # noqa: D301 - click reads the \b line as "do not rewrap this paragraph"
    from agogosml_cli.run import RunOptions
    from agogosml_cli.run_app import AppOptions, resolve_app
    from agogosml_cli.run_paths import (
        check_run_files,
        check_summary_path,
        lock_work_dir,
        prepare_work_dir,
    )

    app = resolve_app(AppOptions(app_module, project, input_file, data, model))
    if app.is_sample:
        missing = missing_packages_message()
        if missing:
            # Exit code 2, as for the other problems found before the run starts.
            raise click.UsageError(missing)
    choice = resolve_stream(StreamOptions(kafka=kafka, **stream))
    invalid = _invalid_variables()
    if invalid:
        # Found before any service starts, like an invalid option value.
        raise click.UsageError("\n".join(invalid))
    inputs = _run_inputs(app, input_file, data, model)
    check_run_files(work_dir, inputs, summary_json)
    prepare_work_dir(work_dir)
    if summary_json is not None:
        check_summary_path(summary_json)
    if app.is_sample:
        _check_model(model)
    # Every option but the dataset, which may still have to be fetched.
    make_options = functools.partial(
        RunOptions,
        work_dir=work_dir,
        limit=limit,
        kafka=choice.kafka,
        eventhubs=choice.eventhubs,
        topics=choice.topics,
        batch_size=batch_size,
        ordering=ordering,
        key_field=key_field,
        stall_timeout_seconds=stall_timeout_seconds,
        model_path=model,
        input_file=input_file,
        app=app,
    )
    with lock_work_dir(work_dir):
        _run_until_signal(make_options, data, summary_json, max_dead_letters)


def _run_until_signal(
    make_options: Callable[..., RunOptions],
    data: Path | None,
    summary_json: Path | None,
    max_dead_letters: int | None = None,
) -> None:
    """Run the pipeline; on SIGINT or SIGTERM, exit with 128 + the signal number.

    `make_options` takes the dataset path as `data_path`. Without `data`, the
    cached dataset is fetched first, unless the options name an input file.
    """
    from agogosml_cli.run import INTERRUPTS

    # SIGTERM ends the run like Ctrl-C, so the services it started are stopped.
    INTERRUPTS.signals.clear()
    received = INTERRUPTS.signals
    previous = {
        signum: signal.signal(signum, INTERRUPTS.handle)
        for signum in (signal.SIGINT, signal.SIGTERM)
    }
    console = Console(stderr=True)
    for name, known in _misspelled_variables():
        console.print(
            f"{name} is not a setting and is ignored; did you mean {known}?",
            markup=False,
            highlight=False,
        )

    def restore_handlers() -> None:
        for signum, handler in previous.items():
            signal.signal(signum, handler)

    try:
        options = make_options(data_path=data)
        if options.data_path is None and options.input_file is None:
            options.data_path = _fetch_dataset(console)
        _run(options, summary_json, console, max_dead_letters)
    except KeyboardInterrupt:
        # Every service is stopped: a further signal would only cut the message.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signum = received[-1] if received else signal.SIGINT
        console.print(
            f"Interrupted by {signal.Signals(signum).name}; no service of the run "
            "is left running."
        )
        # 128 + the signal number, as a shell reports a process ended by it.
        # The signals stay ignored, so that none cuts the exit short.
        sys.exit(128 + signum)
    except BaseException:
        restore_handlers()
        raise
    restore_handlers()


def _misspelled_variables() -> list[tuple[str, str]]:
    """Return (set variable, known variable) pairs of likely misspelt settings.

    The services log the same warning, but a run keeps their logs in files.
    """
    from agogosml.app import AppSettings
    from agogosml.config import (
        EventHubSettings,
        KafkaSettings,
        ReaderSettings,
        WriterSettings,
        misspelled_variables,
    )

    models = (
        ReaderSettings,
        WriterSettings,
        AppSettings,
        KafkaSettings,
        EventHubSettings,
    )
    return [pair for model in models for pair in misspelled_variables(model)]


def _invalid_variables() -> list[str]:
    """Return a line for each set service variable whose value is invalid.

    A service would stop at its start with the same error, after the services
    before it started. The variables that the run sets itself are not read
    from the environment, so their values there do not matter.
    """
    from agogosml.app import AppSettings
    from agogosml.config import ReaderSettings, WriterSettings, invalid_variables
    from agogosml_cli.local import RUN_VARIABLES

    models = (ReaderSettings, WriterSettings, AppSettings)
    return [
        line for model in models for line in invalid_variables(model, RUN_VARIABLES)
    ]


def _run_inputs(
    app: AppChoice, input_file: Path | None, data: Path | None, model: Path | None
) -> dict[str, Path]:
    """Return the files a run reads, by the option or default that names them."""
    from sample_app.data import default_dataset_path

    inputs: dict[str, Path] = {}
    if input_file is not None:
        inputs["--input"] = input_file
    else:
        described = "--data" if data else "the cached dataset (default of --data)"
        inputs[described] = data or default_dataset_path()
    if app.is_sample:
        # sample_app.scoring needs the sample extra, which only this app needs.
        from sample_app.scoring import default_model_path

        described = "--model" if model else "the cached model (default of --model)"
        inputs[described] = model or default_model_path()
    return inputs


def _check_model(model: Path | None) -> None:
    """Raise a usage error when no --model is given and no model was trained yet.

    Its exit code is 2, as for a --model FILE that does not exist.
    """
    from sample_app.scoring import default_model_path

    default = default_model_path()
    if model is None and not default.is_file():
        raise click.UsageError(
            f"no trained model at {str(default)!r}, the default of --model; train "
            "one with 'python -m sample_app.train' (make demo does), or pass "
            "--model FILE"
        )


def _fetch_dataset(console: Console) -> Path:
    from sample_app.data import DatasetError, fetch_dataset

    try:
        info = fetch_dataset()
    except DatasetError as exc:
        raise click.ClickException(
            f"{str(exc).rstrip('.')}, or pass a copy of the CSV with --data FILE"
        ) from None
    console.print(f"Dataset: {info.path} (source: {info.source})", soft_wrap=True)
    return info.path


def _run(
    options: RunOptions,
    summary_json: Path | None,
    console: Console,
    max_dead_letters: int | None = None,
) -> None:
    from agogosml_cli.run import print_summary, run_pipeline

    try:
        summary = run_pipeline(options, console)
    except (RuntimeError, AgogosmlError) as exc:
        raise click.ClickException(str(exc)) from None
    # The summary is the result of the run, so it goes to stdout, and the
    # progress and messages to stderr.
    print_summary(summary, Console())
    if summary_json is not None:
        _write_summary_json(summary_json, summary.to_json(), console)
    if summary.interrupted:
        # The caller reports the signal and exits with its status.
        raise KeyboardInterrupt
    if summary.error:
        raise click.ClickException(f"the run stopped early: {summary.error}")
    if summary.missing:
        console.print(f"[red]{summary.missing} records are missing[/red]")
        sys.exit(1)
    if max_dead_letters is not None and summary.dead_lettered > max_dead_letters:
        console.print(
            f"[red]{summary.dead_lettered:,} records were dead-lettered, more than "
            f"--max-dead-letters {max_dead_letters:,}[/red]"
        )
        sys.exit(1)


def _write_summary_json(path: Path, content: bytes, console: Console) -> None:
    from agogosml_cli.run_paths import write_summary

    try:
        write_summary(path, content)
    except OSError as exc:
        console.print(content.decode(), markup=False, highlight=False)
        raise click.ClickException(
            f"cannot write the summary to {str(path)!r}: {exc.strerror or exc}; "
            "the summary JSON is printed above"
        ) from None
    console.print(f"Summary JSON written to {path}", soft_wrap=True, highlight=False)


@cli.command()
def settings() -> None:
    """Print every environment variable of the services as a Markdown table."""
    from agogosml_cli.reference import settings_reference

    click.echo(settings_reference(), nl=False)


cli.add_command(init)
cli.add_command(generate)
for command in [*RELEASE_COMMANDS, status, *CONTAINER_COMMANDS]:
    cli.add_command(command)

if __name__ == "__main__":
    cli()
