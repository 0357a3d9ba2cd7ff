"""Entry point: ``agogosml-output-writer`` or ``python -m agogosml.writer``."""

from __future__ import annotations

from agogosml.config import WriterSettings
from agogosml.runtime import check_arguments, run_service
from agogosml.writer.service import serve_writer


def main() -> None:
    """Start the output writer with settings from the environment."""
    check_arguments("agogosml-output-writer", WriterSettings)
    run_service(WriterSettings, serve_writer, "output_writer")


if __name__ == "__main__":
    main()
