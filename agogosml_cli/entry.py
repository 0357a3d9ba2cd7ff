"""Entry point of the ``agogosml`` command.

It imports the command-line interface inside a handler of Ctrl-C: importing
it takes about a second, and a Ctrl-C then would otherwise end the command
with a traceback.
"""

from __future__ import annotations

import signal
import sys


def main() -> None:
    """Run the ``agogosml`` command; exit with 130 on a Ctrl-C during start-up."""
    try:
        from agogosml_cli.main import cli
    except KeyboardInterrupt:
        print("\nInterrupted by SIGINT.", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)
    cli()


if __name__ == "__main__":
    main()
