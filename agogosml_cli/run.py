"""``agogosml run``: stream records through input reader, model app and writer."""

from __future__ import annotations

import collections
import contextlib
import itertools
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import orjson
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from agogosml.envelope import MESSAGE_ID_HEADER, Position, position_id
from agogosml.errors import AgogosmlError
from agogosml_cli.local import (
    SLOW_STOP_SECONDS,
    STOP_TIMEOUT_SECONDS,
    ServiceExitError,
    ServiceProcess,
    app_process,
    check_running,
    misspelling_warnings,
    reader_process,
    writer_process,
)

if TYPE_CHECKING:
    from agogosml.config import EventHubSettings, KafkaSettings

#: Files that a run writes to its work directory and deletes at its start.
WORK_FILES = (
    "input.jsonl",
    "output.jsonl",
    "dead-letter.jsonl",
    "checkpoint",
    "reader.log",
    "app.log",
    "writer.log",
)


#: Header of a dead letter with the reason that the input reader gave it.
DEAD_LETTER_ERROR_HEADER = "dlq.error"
#: How many dead-letter reasons the summary keeps, the most frequent first.
TOP_REASONS = 3
#: How many line numbers of dead-lettered --input records the summary names.
SHOWN_LINES = 20
#: Characters of a reason that the summary table shows.
_REASON_CHARS = 300


class RunStalledError(AgogosmlError):
    """No record finished within the stall timeout."""


@dataclass(frozen=True)
class TopicNames:
    """Topics or event hubs named on the command line; None means the default."""

    input: str | None = None
    output: str | None = None
    dead_letter: str | None = None


@dataclass(frozen=True)
class RunTopics:
    """Input, output and dead-letter topics (or event hubs) of one run."""

    input: str
    output: str
    dead_letter: str
    #: The topics named after the run id, which only this run uses.
    run_specific: frozenset[str] = frozenset()

    @classmethod
    def for_run(cls, run_id: str, names: TopicNames) -> RunTopics:
        """Return the named topics, with run-specific names for the others."""
        prefix = f"agogosml-run-{run_id}-"
        input_topic = names.input or f"{prefix}input"
        chosen = (
            input_topic,
            names.output or f"{prefix}output",
            names.dead_letter or f"{input_topic}.dlq",
        )
        run_specific = frozenset(name for name in chosen if name.startswith(prefix))
        return cls(*chosen, run_specific=run_specific)


#: Module of agogosml's sample fraud app.
SAMPLE_APP_MODULE = "sample_app.app"


@dataclass(frozen=True)
class AppChoice:
    """The model app of a run, started as ``python -m module``."""

    module: str = SAMPLE_APP_MODULE
    #: Working directory of the app process; None means that of the run.
    directory: Path | None = None

    @property
    def is_sample(self) -> bool:
        """Whether the app is agogosml's sample fraud app."""
        return self.module == SAMPLE_APP_MODULE

    def description(self) -> str:
        """Return how the run's output names the app."""
        if self.is_sample:
            return f"agogosml's sample fraud app (python -m {self.module})"
        command = f"python -m {self.module}"
        if self.directory is not None:
            command += f" in {self.directory}"
        return command


@dataclass
class RunOptions:
    """Input, output location and reader settings of one `run_pipeline` call."""

    #: Dataset CSV; not read when `input_file` is set.
    data_path: Path | None
    work_dir: Path
    limit: int | None = None
    kafka: KafkaSettings | None = None
    eventhubs: EventHubSettings | None = None
    topics: TopicNames = TopicNames()
    batch_size: int = 100
    ordering: str = "partition"
    #: With Kafka, the field of a JSON object line whose text keys its record.
    key_field: str = "transaction_id"
    stall_timeout_seconds: float = 120.0
    model_path: Path | None = None
    #: JSON Lines file of input values, streamed in place of the dataset.
    input_file: Path | None = None
    #: The model app: the sample fraud app unless the user names a module.
    app: AppChoice = AppChoice()


#: The `error` of a run that SIGINT or SIGTERM ended.
INTERRUPTED = "interrupted by a signal"


@dataclass
class RunSummary:
    """Counts and timings of one run; `missing` should be 0.

    `read` equals `input_records` unless the run stopped early. Then it is
    the count up to the reader's last checkpoint or committed offsets, or
    None when the run cannot tell: through native Event Hubs, or when the
    broker did not return the committed offsets or the whole output.

    A record in neither the output nor the dead letters counts as `missing`
    (lost) when the reader had finished it: in a finished run every record,
    in a run that stopped early those before the reader's last checkpoint
    or committed offsets.
    The others count as `not_finished`. When `read` is None, the run cannot
    tell the two apart, and both are None.
    """

    transport: str
    #: Module of the model app, such as "sample_app.app".
    app: str = SAMPLE_APP_MODULE
    read: int | None = 0
    #: Records that the run put into the input: the dataset or the --input
    #: file, or --limit of it.
    input_records: int = 0
    written: int = 0
    dead_lettered: int = 0
    #: Records both in the output and in the dead letters: the app forwarded
    #: their result, but the reader got no success from the app in the end.
    written_and_dead_lettered: int = 0
    duplicates: int = 0
    missing: int | None = 0
    #: Records that the run stopped before the reader finished: not read yet,
    #: or read but neither written nor dead-lettered yet.
    not_finished: int | None = 0
    #: Written records that the app flagged as fraud. The three fraud counts
    #: are None, and left out of the JSON, when another app than the sample
    #: app runs.
    flagged_as_fraud: int | None = 0
    #: Written records whose Class label is 1, and those of them flagged. A
    #: run that stopped early counts only what it wrote, as the other counts do.
    labelled_fraud: int | None = 0
    flagged_labelled_fraud: int | None = 0
    elapsed_seconds: float = 0.0
    messages_per_second: float = 0.0
    output: str = ""
    dead_letter: str = ""
    #: Topics that the run created and deleted at its end, such as the output.
    deleted_topics: list[str] = field(default_factory=list)
    #: Message ids of up to 20 missing records.
    missing_ids: list[str] = field(default_factory=list)
    #: The most frequent reasons of the dead letters (their ``dlq.error``), up
    #: to three, each as {"reason": ..., "count": ...}, the most frequent first.
    dead_letter_reasons: list[dict[str, Any]] = field(default_factory=list)
    #: Lines of the --input file, counting from 1, of up to 20 dead-lettered
    #: records, in file order. Empty for the dataset, whose ids give the row.
    dead_lettered_lines: list[int] = field(default_factory=list)
    #: Reason the run stopped before every record was accounted for, or "".
    error: str = ""
    #: Whether SIGINT or SIGTERM ended the run, which `error` then names too.
    interrupted: bool = False

    def to_json(self) -> bytes:
        """Return the summary as indented JSON, ending with a newline."""
        data = asdict(self)
        for name in FRAUD_FIELDS:
            if data[name] is None:
                del data[name]
        return orjson.dumps(
            data, option=orjson.OPT_INDENT_2 | orjson.OPT_APPEND_NEWLINE
        )


#: Fields of `RunSummary` that only the sample fraud app has.
FRAUD_FIELDS = ("flagged_as_fraud", "labelled_fraud", "flagged_labelled_fraud")


class OutputReader(Protocol):
    """Reads the output and dead-letter records of a run as they arrive."""

    def poll_into(self, tally: OutputTally, timeout_seconds: float) -> None:
        """Count the records that arrive within `timeout_seconds`."""

    def final_count(self, tally: OutputTally) -> OutputTally | None:
        """Return the count of the whole output once the services stopped.

        `tally` is the count during the run. Returns None when the count
        cannot reach the end of the output.
        """


class StreamBackend(Protocol):
    """A broker that a run streams through: Kafka or native Event Hubs."""

    #: READER_SOURCE and WRITER_SINK of the services.
    transport: str
    topics: RunTopics

    def check_connection(self) -> None:
        """Raise RuntimeError when the broker cannot be reached, before the input."""

    def prepare(self, input_path: Path, count: int, console: Console) -> list[str]:
        """Check or create the topics, then produce the input file to the input.

        Returns the message id of each input record, in the order of the file.
        """

    def service_env(self) -> dict[str, str]:
        """Return the connection variables of the reader and the writer."""

    def reader_env(self) -> dict[str, str]:
        """Return the consumer group and start position variables of the reader."""

    def output_reader(self) -> contextlib.AbstractContextManager[OutputReader]:
        """Return a reader of the run's output and dead-letter records."""

    def committed_ids(self) -> set[str] | None:
        """Return the ids the reader finished and committed, or None if unknown."""

    def delete_created(self, console: Console) -> list[str]:
        """Delete the run-specific topics that `prepare` created, and print them.

        A run cannot resume from them, because every run produces its input
        again. A backend deletes the reader's consumer group of the run too,
        where it made one. When a deletion fails, print what is left and how
        to delete it, and raise nothing. Returns the topics deleted.
        """


class OutputTally:
    """Count output and dead-letter records by message id.

    Every service keeps the message id of a record, so an output or dead
    letter has the id of its input record, whatever the app makes of its value.
    """

    def __init__(self) -> None:
        self.written: set[str] = set()
        self.dead_lettered: set[str] = set()
        #: Dead-lettered records by the reason the input reader gave them.
        self.dead_letter_reasons: collections.Counter[str] = collections.Counter()
        self.duplicates = 0
        #: Written records whose value has a true "is_fraud", as the sample
        #: app's results have for a transaction it flags.
        self.flagged: set[str] = set()

    @property
    def finished(self) -> int:
        """Input records accounted for: written or dead-lettered."""
        return len(self.written | self.dead_lettered)

    def add_output(self, message_id: str, value: Any) -> None:
        """Count one output record."""
        if message_id in self.written:
            self.duplicates += 1
            return
        self.written.add(message_id)
        if isinstance(value, dict) and value.get("is_fraud"):
            self.flagged.add(message_id)

    def add_dead_letter(self, message_id: str, reason: str = "") -> None:
        """Count one dead-lettered record, and its reason once per record."""
        if reason and message_id not in self.dead_lettered:
            self.dead_letter_reasons[reason] += 1
        self.dead_lettered.add(message_id)


class InputLines(NamedTuple):
    """The lines of a run's input file, which contains one record a line."""

    #: Byte offset of each line, in file order.
    offsets: list[int]
    #: Indexes of the lines whose Class label is 1, or None when the sample
    #: app does not run, so that the summary has no fraud counts.
    labelled_fraud: frozenset[int] | None
    #: Line of each record in the --input file, counting from 1, or None
    #: for the dataset.
    source_lines: list[int] | None = None


class InputRecords(NamedTuple):
    """The message ids of a run's input records, in order, and those labelled fraud."""

    ids: list[str]
    #: None when the summary has no fraud counts.
    labelled_fraud: frozenset[str] | None
    #: Line of each record in the --input file, or None for the dataset.
    source_lines: list[int] | None = None

    @classmethod
    def of(cls, lines: InputLines, ids: list[str]) -> InputRecords:
        """Return the records of `lines`, whose message ids are `ids`."""
        labelled = None
        if lines.labelled_fraud is not None:
            labelled = frozenset(ids[index] for index in lines.labelled_fraud)
        return cls(ids, labelled, lines.source_lines)


def write_input_file(options: RunOptions, path: Path) -> InputLines:
    """Write the input records to `path` as JSON Lines; return where each starts.

    The records are the lines of `options.input_file`, else the dataset rows.

    Raises:
        DatasetFormatError: The CSV is invalid; for a row, the message names
            its line in the file, counting the header as line 1.
    """
    source_lines: list[int] | None = None
    if options.input_file is not None:
        source_lines = []
        values = _read_json_lines(options.input_file, options.limit, source_lines)
    else:
        values = _read_dataset(options)
    offsets: list[int] = []
    labelled: set[int] = set()
    offset = 0
    with path.open("wb") as file:
        for index, (line, value) in enumerate(values):
            offsets.append(offset)
            if isinstance(value, dict) and value.get("Class") == 1:
                labelled.add(index)
            file.write(line + b"\n")
            offset += len(line) + 1
    if not options.app.is_sample:
        return InputLines(offsets, None, source_lines)
    return InputLines(offsets, frozenset(labelled), source_lines)


def _read_dataset(options: RunOptions) -> Iterator[tuple[bytes, Any]]:
    """Yield each dataset row as a JSON line and as a dict."""
    from sample_app.data import iter_transactions

    assert options.data_path is not None
    for transaction in iter_transactions(options.data_path, options.limit):
        yield orjson.dumps(transaction), transaction


def _read_json_lines(
    path: Path, limit: int | None, numbers: list[int]
) -> Iterator[tuple[bytes, Any]]:
    """Yield each JSON line of `path` and its value, without blank lines.

    A line keeps its bytes, without the whitespace around it, so the app gets
    the value as the file has it. `check_input_file` checked the lines. The
    number of each line yielded, counting from 1, is appended to `numbers`.
    """
    count = 0
    with path.open("rb") as file:
        for number, raw in enumerate(file, start=1):
            line = raw.removeprefix(UTF8_BOM).strip()
            if not line:
                continue
            if limit is not None and count >= limit:
                return
            count += 1
            numbers.append(number)
            try:
                value = orjson.loads(line)
            except orjson.JSONDecodeError:
                # An integer beyond the range of a double, which the services
                # decode exactly. Only the sample app's labels need the value.
                value = None
            yield line, value


#: The byte order mark that some editors write at the start of a UTF-8 file.
UTF8_BOM = b"\xef\xbb\xbf"


def file_message_ids(input_path: Path, offsets: list[int]) -> list[str]:
    """Return the message ids that the file reader gives the lines at `offsets`.

    The reader reads `input_path` as the run names it in READER_INPUT.
    """
    return [
        position_id(Position(str(input_path), 0, offset, offset)) for offset in offsets
    ]


def run_pipeline(options: RunOptions, console: Console) -> RunSummary:
    """Run reader, model app and writer until every input record is accounted for."""
    console.print(f"App: {options.app.description()}", soft_wrap=True)
    backend = _stream_backend(options)
    if backend is not None:
        # Writing the input of the whole dataset takes seconds, which a run
        # that cannot reach its broker should not spend.
        backend.check_connection()
    options.work_dir.mkdir(parents=True, exist_ok=True)
    for stale in WORK_FILES:
        (options.work_dir / stale).unlink(missing_ok=True)
    input_path = options.work_dir / "input.jsonl"
    source = options.input_file or options.data_path
    console.print(f"Preparing input from {source} ...", soft_wrap=True)
    lines = write_input_file(options, input_path)
    if backend is not None:
        return _run_stream(options, lines, input_path, backend, console)
    records = InputRecords.of(lines, file_message_ids(input_path, lines.offsets))
    return _run_files(options, records, input_path, console)


def _stream_backend(options: RunOptions) -> StreamBackend | None:
    run_id = uuid.uuid4().hex[:8]
    topics = RunTopics.for_run(run_id, options.topics)
    if options.eventhubs is not None:
        from agogosml_cli.eventhubs_run import EventHubsBackend

        return EventHubsBackend(options.eventhubs, topics, run_id)
    if options.kafka is not None:
        from agogosml_cli.kafka_run import KafkaBackend

        return KafkaBackend(options.kafka, topics, run_id, key_field=options.key_field)
    return None


def _reader_settings(options: RunOptions) -> dict[str, str]:
    """Return the reader variables that the options set.

    READER_BATCH_MAX_MESSAGES and READER_ORDERING come from --batch-size and
    --ordering, which default to them. READER_MAX_IN_FLIGHT is set only when
    the environment does not set it.
    """
    settings = {
        "READER_BATCH_MAX_MESSAGES": str(options.batch_size),
        "READER_ORDERING": options.ordering,
    }
    if "READER_MAX_IN_FLIGHT" not in os.environ:
        settings["READER_MAX_IN_FLIGHT"] = str(max(1000, options.batch_size * 20))
    return settings


def _app_process(options: RunOptions, writer_url: str) -> ServiceProcess:
    extra = {}
    if options.model_path is not None:
        extra["SAMPLE_APP_MODEL_PATH"] = str(options.model_path.resolve())
    return app_process(
        options.work_dir,
        writer_url,
        module=options.app.module,
        directory=options.app.directory,
        extra=extra,
    )


def _start_app(
    options: RunOptions, writer_url: str, started: ServiceList, console: Console
) -> ServiceProcess:
    """Start the model app, wait until it is ready and print its settings warnings.

    The run warned about misspelled ``APP_`` variables before it started, but
    only the app defines the prefixes of its own settings (the
    ``extra_settings`` of ``ModelApp``), so their warnings come from its log.
    """
    from agogosml.app import AppSettings

    app = started.start(_app_process(options, writer_url))
    app.wait_ready(60, others=started)
    app_prefix = AppSettings.model_config.get("env_prefix", "")
    for warning in misspelling_warnings(app.log_path):
        if not warning.upper().startswith(app_prefix):
            console.print(warning, markup=False, highlight=False)
    return app


def _run_files(
    options: RunOptions, records: InputRecords, input_path: Path, console: Console
) -> RunSummary:
    ids = records.ids
    work = options.work_dir
    output = work / "output.jsonl"
    dead_letter = work / "dead-letter.jsonl"
    checkpoint = work / "checkpoint"
    writer = writer_process(work, sink="file", output=str(output))
    tally = OutputTally()
    outputs = _JsonLinesFollower(output)
    dead = _JsonLinesFollower(dead_letter)

    def read_files() -> None:
        for record in outputs.read_new():
            tally.add_output(str(record.get("id")), record.get("value"))
        for record in dead.read_new():
            headers = record.get("headers") or {}
            reason = str(headers.get(DEAD_LETTER_ERROR_HEADER) or "")
            tally.add_dead_letter(str(record.get("id")), reason)

    error = ""
    with _services(writer) as started:
        app = _start_app(options, writer.url, started, console)
        reader_env = {
            **_reader_settings(options),
            "READER_STOP_AT_END": "true",
            "READER_DEAD_LETTER": str(dead_letter),
            "READER_CHECKPOINT_PATH": str(checkpoint),
        }
        reader = reader_process(
            work, app.url, source="file", input_=str(input_path), extra=reader_env
        )
        started_at = time.monotonic()
        started.start(reader)

        def poll() -> bool:
            read_files()
            # The reader exits by itself at the end of the input file.
            check_running([writer, app], "during the run")
            return not reader.running()

        try:
            _follow(console, len(ids), tally, poll, options.stall_timeout_seconds)
            _check_exit(reader, tally.finished < len(ids), input_path, checkpoint)
        except (ServiceExitError, RunStalledError) as exc:
            error = str(exc)
        except KeyboardInterrupt:
            error = INTERRUPTED
        elapsed = time.monotonic() - started_at
    if started.interrupted and not error:
        error = INTERRUPTED
    if error:
        # Ctrl-C can discard lines that were read but not counted yet, so
        # the files are counted again from the start.
        tally = OutputTally()
        outputs = _JsonLinesFollower(output)
        dead = _JsonLinesFollower(dead_letter)
    # Count what the writer and the reader wrote while they were stopped.
    read_files()
    summary = _summarise("file", records, tally, elapsed)
    summary.app = options.app.module
    summary.output, summary.dead_letter = str(output), str(dead_letter)
    summary.error = error
    summary.interrupted = error == INTERRUPTED
    if error:
        # The reader has stopped, so its checkpoint is final.
        read = _lines_before(input_path, _checkpoint_offset(checkpoint))
        split_unfinished(summary, ids[:read], ids[read:], tally)
    return summary


def _run_stream(
    options: RunOptions,
    lines: InputLines,
    input_path: Path,
    backend: StreamBackend,
    console: Console,
) -> RunSummary:
    try:
        summary = _stream(options, lines, input_path, backend, console)
    except BaseException:
        # Also after a failure or a Ctrl-C.
        backend.delete_created(console)
        raise
    # After the summary read the topics.
    summary.deleted_topics = backend.delete_created(console)
    return summary


def _stream(
    options: RunOptions,
    lines: InputLines,
    input_path: Path,
    backend: StreamBackend,
    console: Console,
) -> RunSummary:
    topics = backend.topics
    records = InputRecords.of(
        lines, backend.prepare(input_path, len(lines.offsets), console)
    )
    ids = records.ids
    work = options.work_dir
    writer = writer_process(
        work, sink=backend.transport, output=topics.output, extra=backend.service_env()
    )
    tally = OutputTally()
    error = ""
    with backend.output_reader() as output_reader:
        with _services(writer) as started:
            app = _start_app(options, writer.url, started, console)
            reader_env = {
                **backend.service_env(),
                **backend.reader_env(),
                **_reader_settings(options),
                "READER_DEAD_LETTER": topics.dead_letter,
            }
            reader = reader_process(
                work,
                app.url,
                source=backend.transport,
                input_=topics.input,
                extra=reader_env,
            )
            started_at = time.monotonic()
            started.start(reader)

            def poll() -> bool:
                output_reader.poll_into(tally, 0.2)
                check_running(started, "during the run")
                return False

            try:
                _follow(console, len(ids), tally, poll, options.stall_timeout_seconds)
            except (ServiceExitError, RunStalledError) as exc:
                error = str(exc)
            except KeyboardInterrupt:
                error = INTERRUPTED
            elapsed = time.monotonic() - started_at
        if started.interrupted and not error:
            error = INTERRUPTED
        whole_output = True
        if error:
            # With what the writer and the reader wrote while they stopped.
            console.print("Counting the output and the dead letters ...")
            final = output_reader.final_count(tally)
            whole_output = final is not None
            tally = final or tally
    summary = _summarise(backend.transport, records, tally, elapsed)
    summary.app = options.app.module
    summary.output, summary.dead_letter = topics.output, topics.dead_letter
    summary.error = error
    summary.interrupted = error == INTERRUPTED
    if error:
        # Without the whole output, records still on their way would count
        # as missing.
        committed = backend.committed_ids() if whole_output else None
        if committed is None:
            summary.read = summary.missing = summary.not_finished = None
            summary.missing_ids = []
        else:
            read = [message for message in ids if message in committed]
            unread = [message for message in ids if message not in committed]
            split_unfinished(summary, read, unread, tally)
    return summary


class ServiceList(list[ServiceProcess]):
    """The services of a run, in the order they started."""

    #: Whether a Ctrl-C or SIGTERM came while they stopped, so they were killed.
    interrupted = False

    def start(self, service: ServiceProcess) -> ServiceProcess:
        """List `service`, then start it and return it.

        Listed first, a service that a Ctrl-C interrupts right after its
        start is stopped with the others.
        """
        self.append(service)
        return service.start()


@contextlib.contextmanager
def _services(first: ServiceProcess) -> Iterator[ServiceList]:
    started = ServiceList()
    try:
        started.start(first)
        first.wait_ready(60)
        yield started
    finally:
        started.interrupted = stop_services(started)


@dataclass
class Interrupts:
    """The SIGINT and SIGTERM signals of a run, and whether its services stop now.

    `handle` is the run's handler of both. The first signal raises
    KeyboardInterrupt, which ends the run, and so does one while the services
    stop, which kills them. A signal after they stopped is only recorded, so
    that the summary of the run is still printed and written.
    """

    signals: list[int] = field(default_factory=list)
    stopping: bool = False

    def handle(self, signum: int, frame: object) -> None:
        """Record `signum`, and raise KeyboardInterrupt for the first signal.

        A signal while the services stop raises it too, so they are killed.
        """
        self.signals.append(signum)
        if len(self.signals) == 1 or self.stopping:
            raise KeyboardInterrupt


#: The signals of the current run, which `agogosml run` handles with `handle`.
INTERRUPTS = Interrupts()


def stop_services(services: list[ServiceProcess]) -> bool:
    """Stop the services, the last started first; return whether a signal came.

    Each stops gracefully. A Ctrl-C or SIGTERM while they stop, such as a
    second one after the Ctrl-C that ended the run, kills those still
    running, so that none outlives the run. So does a second signal that came
    before they began to stop. The run still counts what they did. The
    services run in process groups of their own, so a terminal's Ctrl-C does
    not reach them.
    """
    try:
        INTERRUPTS.stopping = True
        if len(INTERRUPTS.signals) < 2:
            for service in reversed(services):
                service.stop(on_slow=_report_slow_stop)
            return False
    except KeyboardInterrupt:
        pass
    finally:
        INTERRUPTS.stopping = False
    # A further signal must not cut the killing short.
    previous = {
        signum: signal.signal(signum, signal.SIG_IGN)
        for signum in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        for service in services:
            service.kill()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return True


def _report_slow_stop(service: ServiceProcess) -> None:
    """Say that the run waits for `service` to stop, and how to kill it now."""
    print(
        f"Waiting for the {service.name} ({service.module}) to stop: it is still "
        f"running {SLOW_STOP_SECONDS:.0f} s after SIGTERM, and is killed "
        f"{STOP_TIMEOUT_SECONDS:.0f} s after it. Press Ctrl-C to kill it now.",
        file=sys.stderr,
    )


def _follow(
    console: Console, total: int, tally: OutputTally, poll: Any, stall_seconds: float
) -> None:
    columns = (*Progress.get_default_columns()[:2], MofNCompleteColumn())
    with Progress(
        *columns, BarColumn(bar_width=None), TimeElapsedColumn(), console=console
    ) as progress:
        task = progress.add_task("streaming", total=total)
        last_count, last_change = 0, time.monotonic()
        reason_shown = False
        while tally.finished < total:
            stopped = poll()
            progress.update(task, completed=tally.finished)
            if not reason_shown and tally.dead_letter_reasons:
                reason_shown = True
                _show_first_dead_letter(progress.console, tally)
            if tally.finished != last_count:
                last_count, last_change = tally.finished, time.monotonic()
            elif time.monotonic() - last_change > stall_seconds:
                raise RunStalledError(
                    f"no progress for {stall_seconds:.0f} s with "
                    f"{total - tally.finished} records outstanding"
                )
            if stopped:
                poll()
                progress.update(task, completed=tally.finished)
                break
            time.sleep(0.1)


def _show_first_dead_letter(console: Console, tally: OutputTally) -> None:
    """Print the reason of the first dead letter once, while the run goes on.

    A bug of the app, such as a scoring function that returns the wrong type,
    fails every record the same way after the reader's retries, so the reason
    helps long before the summary does.
    """
    ((reason, _),) = tally.dead_letter_reasons.most_common(1)
    console.print(
        f"records are being dead-lettered; the first reason: {_shown(reason)}",
        style="yellow",
        markup=False,
        highlight=False,
    )


#: How long the file reader may take to exit once the run has ended.
READER_EXIT_SECONDS = 60


def _check_exit(
    reader: ServiceProcess, records_missing: bool, input_path: Path, checkpoint: Path
) -> None:
    """Raise `ServiceExitError` if the file reader failed or stopped before the end.

    A reader that is stopped by a signal exits with code 0 too, so with
    records missing, its final checkpoint shows whether it read the whole
    input. Without missing records, the reader has read everything, whatever
    its checkpoint contains. A reader that has not exited within
    `READER_EXIT_SECONDS` raises `RunStalledError`.
    """
    try:
        code = reader.wait(READER_EXIT_SECONDS)
    except subprocess.TimeoutExpired:
        raise RunStalledError(
            f"the input reader did not exit within {READER_EXIT_SECONDS} s after "
            f"the end of the input; its log is {reader.log_path}"
        ) from None
    stopped_early = (
        records_missing and _checkpoint_offset(checkpoint) < input_path.stat().st_size
    )
    if code != 0 or stopped_early:
        raise ServiceExitError(reader, "before the end of the input")


def _checkpoint_offset(checkpoint: Path) -> int:
    """Return the byte offset in the file reader's checkpoint, or 0 if there is none.

    The offset is the first word of the checkpoint; its fingerprint follows.
    """
    try:
        return int(checkpoint.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


def _lines_before(path: Path, offset: int) -> int:
    """Return how many complete lines the first `offset` bytes of `path` contain."""
    count = 0
    with path.open("rb") as file:
        while offset > 0:
            chunk = file.read(min(offset, 1 << 20))
            if not chunk:
                break
            count += chunk.count(b"\n")
            offset -= len(chunk)
    return count


def split_unfinished(
    summary: RunSummary, read: list[str], unread: list[str], tally: OutputTally
) -> None:
    """Set the counts of a run that stopped early, from the ids the reader finished.

    `read` are the records before the reader's last checkpoint or committed
    offsets, which cover only records that it finished: one of them in
    neither the output nor the dead letters was lost. A record of `unread`
    may simply not have been read yet.
    """
    missing = _unaccounted(read, tally)
    summary.read = len(read)
    summary.missing = len(missing)
    summary.missing_ids = missing[:20]
    summary.not_finished = len(_unaccounted(unread, tally))


def _unaccounted(ids: list[str], tally: OutputTally) -> list[str]:
    """Return the ids that are in neither the output nor the dead letters."""
    accounted = tally.written | tally.dead_lettered
    return [message for message in ids if message not in accounted]


def _summarise(
    transport: str, records: InputRecords, tally: OutputTally, elapsed: float
) -> RunSummary:
    ids = records.ids
    missing = _unaccounted(ids, tally)
    summary = RunSummary(
        transport=transport,
        read=len(ids),
        input_records=len(ids),
        written=len(tally.written),
        dead_lettered=len(tally.dead_lettered),
        written_and_dead_lettered=len(tally.written & tally.dead_lettered),
        duplicates=tally.duplicates,
        missing=len(missing),
        elapsed_seconds=round(elapsed, 3),
        messages_per_second=round(tally.finished / elapsed, 1) if elapsed > 0 else 0.0,
        missing_ids=missing[:20],
        dead_letter_reasons=[
            {"reason": reason, "count": count}
            for reason, count in tally.dead_letter_reasons.most_common(TOP_REASONS)
        ],
        dead_lettered_lines=_dead_lettered_lines(records, tally),
    )
    labelled = records.labelled_fraud
    if labelled is None:
        summary.flagged_as_fraud = None
        summary.labelled_fraud = summary.flagged_labelled_fraud = None
    else:
        summary.flagged_as_fraud = len(tally.flagged)
        summary.labelled_fraud = len(tally.written & labelled)
        summary.flagged_labelled_fraud = len(tally.flagged & labelled)
    return summary


def _dead_lettered_lines(records: InputRecords, tally: OutputTally) -> list[int]:
    """Return the --input lines of the first `SHOWN_LINES` dead-lettered records."""
    if records.source_lines is None or not tally.dead_lettered:
        return []
    lines = (
        number
        for message_id, number in zip(records.ids, records.source_lines, strict=True)
        if message_id in tally.dead_lettered
    )
    return list(itertools.islice(lines, SHOWN_LINES))


def print_summary(summary: RunSummary, console: Console) -> None:
    """Print the summary as a table."""
    table = Table(title="agogosml run", show_header=False)
    rows: list[tuple[str, str | Text]] = [
        ("app", f"python -m {summary.app}"),
        ("transport", summary.transport),
        *_read_rows(summary),
        ("written", f"{summary.written:,}"),
        ("dead-lettered", f"{summary.dead_lettered:,}"),
        *_reason_rows(summary),
        *_dead_lettered_line_rows(summary),
        *_written_and_dead_lettered_rows(summary),
        ("duplicates", f"{summary.duplicates:,}"),
        *_missing_rows(summary),
        *_fraud_rows(summary),
        ("elapsed", f"{summary.elapsed_seconds:.1f} s"),
        ("throughput", f"{summary.messages_per_second:,.0f} messages/s"),
        ("output", _topic_text(summary, summary.output)),
        ("dead letters", _topic_text(summary, summary.dead_letter)),
    ]
    if summary.error:
        rows.append(("stopped early", "yes: the counts cover only part of the run"))
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)


def _reason_rows(summary: RunSummary) -> list[tuple[str, Text]]:
    """Show the most frequent dead-letter reason, which often names an app bug."""
    if not summary.dead_letter_reasons:
        return []
    top = summary.dead_letter_reasons[0]
    reason = _shown(str(top["reason"]))
    # A Text, not a str, because rich reads brackets in a str as markup, and
    # the app's error text may contain them, such as "[/]" in a JSON body.
    count = int(top["count"])
    noun = "record" if count == 1 else "records"
    return [("top dead-letter reason", Text(f"{count:,} {noun}: {reason}"))]


def _dead_lettered_line_rows(summary: RunSummary) -> list[tuple[str, str]]:
    """Return the summary row with the --input lines of the dead-lettered records."""
    lines = summary.dead_lettered_lines
    if not lines:
        return []
    text = ", ".join(str(number) for number in lines)
    more = summary.dead_lettered - len(lines)
    if more > 0:
        text += f" and {more:,} more"
    return [("dead-lettered lines", text)]


def _shown(reason: str) -> str:
    """Return a dead-letter reason to print: escaped, and cut to `_REASON_CHARS`."""
    reason = _escape_control_characters(reason)
    if len(reason) > _REASON_CHARS:
        reason = reason[: _REASON_CHARS - 1] + "…"
    return reason


def _escape_control_characters(text: str) -> str:
    r"""Return `text` with each non-printable character as its escape, like \x1b."""
    return "".join(
        char if char.isprintable() else char.encode("unicode_escape").decode()
        for char in text
    )


def _written_and_dead_lettered_rows(summary: RunSummary) -> list[tuple[str, str]]:
    both = summary.written_and_dead_lettered
    if not both:
        return []
    return [
        (
            "written and dead-lettered",
            f"{both:,}: the app forwarded their results, then the reader got no "
            "success from it and dead-lettered them too",
        )
    ]


def _topic_text(summary: RunSummary, topic: str) -> str:
    if topic in summary.deleted_topics:
        return f"{topic} (deleted when the run ended)"
    return topic


def _fraud_rows(summary: RunSummary) -> list[tuple[str, str]]:
    if summary.flagged_as_fraud is None:
        return []
    return [
        ("flagged as fraud", f"{summary.flagged_as_fraud:,}"),
        (
            "labelled fraud",
            f"{summary.labelled_fraud:,} of the written records "
            f"({summary.flagged_labelled_fraud:,} of them flagged)",
        ),
    ]


def _read_rows(summary: RunSummary) -> list[tuple[str, str]]:
    if summary.read is None:
        read = "unknown, because the run stopped early"
    elif summary.error:
        place = "checkpoint" if summary.transport == "file" else "committed offsets"
        read = f"{summary.read:,}, up to the input reader's last {place}"
    else:
        return [("read", f"{summary.read:,}")]
    return [("input records", f"{summary.input_records:,}"), ("read", read)]


def _missing_rows(summary: RunSummary) -> list[tuple[str, str]]:
    read, missing = summary.read, summary.missing
    if read is None or missing is None or summary.not_finished is None:
        unknown = "unknown, because the run cannot tell which records the reader read"
        return [("missing", unknown)]
    if not summary.error:
        return [("missing", f"{missing:,}")]
    return [
        ("missing", f"{missing:,} of the {read:,} records that the reader finished"),
        (
            "not finished",
            f"{summary.not_finished:,}, not read or still in flight when the run "
            "stopped",
        ),
    ]


class _JsonLinesFollower:
    """Read the complete lines appended to a file since the last call."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._offset = 0
        self._partial = b""

    def read_new(self) -> list[dict[str, Any]]:
        if not self._path.exists():
            return []
        with self._path.open("rb") as file:
            file.seek(self._offset)
            data = file.read()
        self._offset += len(data)
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        return [orjson.loads(line) for line in lines if line.strip()]


def message_id_of(headers: list[tuple[str, str | bytes | None]] | None) -> str:
    """Return the message-id header of a Kafka record, or ''."""
    return header_text(headers, MESSAGE_ID_HEADER)


def header_text(
    headers: list[tuple[str, str | bytes | None]] | None, header_name: str
) -> str:
    """Return the first header named `header_name` of a Kafka record as text, or ''."""
    for name, value in headers or ():
        if name == header_name:
            if isinstance(value, bytes):
                return value.decode("utf-8", "replace")
            return str(value or "")
    return ""
