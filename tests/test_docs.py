from pathlib import Path

from agogosml_cli.reference import settings_reference

DOCS = Path(__file__).parents[1] / "docs"


def test_configuration_reference_is_current() -> None:
    page = (DOCS / "configuration.md").read_text()

    assert settings_reference() in page, (
        "docs/configuration.md is out of date; regenerate its tables with "
        "'agogosml settings'"
    )
