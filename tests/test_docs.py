import re
from pathlib import Path

import click
import pytest

from agogosml_cli.main import cli
from agogosml_cli.reference import settings_reference

DOCS = Path(__file__).parents[1] / "docs"


def test_configuration_reference_is_current() -> None:
    page = (DOCS / "configuration.md").read_text()

    assert settings_reference() in page, (
        "docs/configuration.md is out of date; regenerate its tables with "
        "'agogosml settings'"
    )


def test_configuration_reference_gives_ranges() -> None:
    reference = settings_reference()

    assert "| `KAFKA_COMMIT_INTERVAL_MS` | `1000` | at least `10` |" in reference
    assert "| `READER_PORT` | `8081` | `0` to `65535` |" in reference
    assert "| `READER_ORDERING` | `partition` |  |" in reference


def test_cli_doc_lists_every_option() -> None:
    page = (DOCS / "cli.md").read_text()
    headings = re.findall(r"^#{2,3} `agogosml (\S+)`$", page, flags=re.MULTILINE)

    for name, command in cli.commands.items():
        assert name in headings, f"docs/cli.md has no section for {name}"
        for param in command.params:
            if not isinstance(param, click.Option):
                continue
            for option in param.opts:
                assert f"`{option}" in page, f"{name} {option}"


def cli_doc_section(command: str) -> str:
    """Return the section of docs/cli.md on `command`, with `\\|` read as `|`."""
    page = (DOCS / "cli.md").read_text()
    start = page.index(f"\n## `agogosml {command}`\n")
    end = page.find("\n## ", start + 1)
    return page[start:end].replace("\\|", "|")


@pytest.mark.parametrize("name", ["init", "generate"])
def test_cli_doc_writes_options_as_help_does(name: str) -> None:
    """Each option's table row and synopsis entry reads as in --help."""
    command = cli.commands[name]
    context = click.Context(command, info_name=name)
    section = cli_doc_section(name)
    rows = re.findall(r"^\| `(--[^`]*)` \|", section, flags=re.MULTILINE)
    synopsis = [
        entry
        for line in section.splitlines()
        if line.startswith(f"agogosml {name} ")
        for entry in re.findall(r"\[(--[a-z-]+(?: [^\]\s]+)?)\]", line)
    ]
    helped = {}
    for param in command.params:
        record = param.get_help_record(context)
        if isinstance(param, click.Option) and record is not None:
            helped[param.opts[0]] = record[0]

    for option, written in helped.items():
        assert written in rows, f"docs/cli.md writes {option} unlike --help: {written}"
    for row in rows:
        assert row in helped.values(), f"docs/cli.md: `{row}` is not in --help"
    assert synopsis
    for entry in synopsis:
        assert entry in helped.values(), f"docs/cli.md: [{entry}] is not in --help"
