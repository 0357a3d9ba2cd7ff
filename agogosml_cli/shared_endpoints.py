"""Find a source and a sink that name the same topic, event hub or file.

The input reader would then read the scored records or its dead letters again
as input, or two streams would mix in one place. The manifest rejects such a
pipeline, and ``agogosml run`` rejects the same mistake in its options with
the same consequences (`SHARED_EFFECTS`).

The checks work on manifest models and on the plain mappings that
``agogosml init`` collects, so init can ask again before it writes anything.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

#: Consequence of two roles sharing one topic or file, by the pair of roles.
SHARED_EFFECTS = {
    ("input", "output"): "the scored records would be read again as input",
    ("input", "dead-letter"): "the dead letters would be read again as input",
    ("output", "dead-letter"): "scored records and dead letters would mix",
    ("output", "checkpoint"): (
        "the input reader's checkpoints would replace the scored records"
    ),
}

_STREAM_TYPES = ("kafka", "eventhubs")
# Suffixes of the names that the input reader derives from its first input
# when none is configured: its dead-letter topic or event hub, and in
# docker-compose.yml its dead-letter file and checkpoint file.
_DEAD_LETTER_TOPIC_SUFFIX = ".dlq"
_DEAD_LETTER_FILE_SUFFIX = ".dlq.jsonl"
_CHECKPOINT_SUFFIX = ".checkpoint"


@dataclass(frozen=True)
class _Name:
    """A topic or file name that one role of the pipeline uses.

    `field` is the manifest field that contains the name, and `path` the
    whole file path of a file endpoint. A name that the input reader derives
    from its input has a `derived` description, which messages show in place
    of `field`.
    """

    role: str
    field: str
    value: str
    path: str = ""
    derived: str = ""


class SharedEndpointError(ValueError):
    """Two roles of a pipeline (input, output, dead letters, checkpoint) share a name.

    `describe` words the message with labels for the manifest fields, such as
    the command-line flags that set them.
    """

    def __init__(self, first: _Name, second: _Name, kind: str) -> None:
        self.first = first
        self.second = second
        self.kind = kind
        super().__init__(self.describe())

    def describe(self, label: Callable[[str], str] = str) -> str:
        """Return the message, naming each manifest field as `label` returns it."""
        first, second = self.first, self.second
        effect = SHARED_EFFECTS[first.role, second.role]
        if second.derived:
            fix = f"change {label(first.field)}"
        elif self.kind == "file" and first.path != second.path:
            fix = "give each its own file name"
        else:
            fix = f"give each its own {self.kind}"
        return f"{self._subject(label)} {self._object()}, so {effect}; {fix}"

    def _subject(self, label: Callable[[str], str]) -> str:
        names = []
        for name in (self.first, self.second):
            if name.derived:
                names.append(name.derived)
            elif self.kind == "file" and self.first.path != self.second.path:
                names.append(f"{label(name.field)} {name.path!r}")
            else:
                names.append(label(name.field))
        return " and ".join(names)

    def _object(self) -> str:
        if self.kind != "file":
            return f"name the same {self.kind} {self.first.value!r}"
        if self.first.path == self.second.path:
            return f"name the same file {self.first.path!r}"
        return (
            f"name the same file {self.first.value!r} in ./data, where "
            "docker-compose.yml puts file endpoints by their file name"
        )


def flag_label(flags: Mapping[str, str]) -> Callable[[str], str]:
    """Return a function that adds the flag of a field to its path.

    The label of ``sink.topic`` is then "sink.topic (--sink-topic)". `flags`
    maps paths without list indexes, such as ``source.topics``, to flags.
    """

    def label(path: str) -> str:
        flag = flags.get(re.sub(r"\[\d+\]", "", path))
        return f"{path} ({flag})" if flag else path

    return label


def find_shared_endpoint(source: Any, sink: Any) -> SharedEndpointError | None:
    """Return the first pair of roles that share a name, or None.

    `source` and `sink` are manifest endpoints, as models or as mappings; a
    sink of None checks the source alone. A file endpoint never shares a name
    with a stream, and two streams are on one cluster or namespace, because
    the manifest requires one connection for both.
    """
    source_type, sink_type = _get(source, "type"), _get(sink, "type")
    if source_type in _STREAM_TYPES and sink_type in (*_STREAM_TYPES, None):
        kind = "event hub" if source_type == "eventhubs" else "topic"
        return _first_shared(_stream_names(source, sink), kind)
    if source_type == "file" and sink_type == "file":
        return _first_shared(_file_names(source, sink), "file")
    return None


def _stream_names(source: Any, sink: Any) -> list[_Name]:
    topics = [topic for topic in _get(source, "topics") or [] if isinstance(topic, str)]
    names = [
        _Name("input", f"source.topics[{index}]", topic)
        for index, topic in enumerate(topics)
    ]
    sink_topic = _get(sink, "topic")
    if isinstance(sink_topic, str):
        names.append(_Name("output", "sink.topic", sink_topic))
    if topics:
        names.append(
            _Name(
                "dead-letter",
                "source.topics[0]",
                topics[0] + _DEAD_LETTER_TOPIC_SUFFIX,
                derived="the input reader's dead-letter topic "
                f"'<source.topics[0]>{_DEAD_LETTER_TOPIC_SUFFIX}'",
            )
        )
    return names


def _file_names(source: Any, sink: Any) -> list[_Name]:
    source_path, sink_path = _get(source, "path"), _get(sink, "path")
    if not isinstance(source_path, str) or not isinstance(sink_path, str):
        return []
    source_file = _file_name(source_path)
    names = [
        _Name("input", "source.path", source_file, source_path),
        _Name("output", "sink.path", _file_name(sink_path), sink_path),
    ]
    for role, suffix in (
        ("dead-letter", _DEAD_LETTER_FILE_SUFFIX),
        ("checkpoint", _CHECKPOINT_SUFFIX),
    ):
        names.append(
            _Name(
                role,
                "source.path",
                source_file + suffix,
                derived=f"the input reader's {role} file '<file name of "
                f"source.path>{suffix}'",
            )
        )
    return names


def _first_shared(names: list[_Name], kind: str) -> SharedEndpointError | None:
    for index, first in enumerate(names):
        for second in names[index + 1 :]:
            if first.value != second.value:
                continue
            if (first.role, second.role) in SHARED_EFFECTS:
                return SharedEndpointError(first, second, kind)
            if (second.role, first.role) in SHARED_EFFECTS:
                return SharedEndpointError(second, first, kind)
    return None


def _file_name(path: str) -> str:
    return path.rsplit("/", 1)[-1]


def _get(endpoint: Any, name: str) -> Any:
    if isinstance(endpoint, Mapping):
        return endpoint.get(name)
    return getattr(endpoint, name, None)
