import re
from pathlib import Path

import click

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
