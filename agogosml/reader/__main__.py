"""Entry point: ``agogosml-input-reader`` or ``python -m agogosml.reader``."""

from __future__ import annotations

from agogosml.config import ReaderSettings
from agogosml.reader.service import serve_reader
from agogosml.runtime import check_arguments, run_service


def main() -> None:
    """Start the input reader with settings from the environment."""
    check_arguments("agogosml-input-reader", ReaderSettings)
    run_service(ReaderSettings, serve_reader, "input_reader")


if __name__ == "__main__":
    main()
