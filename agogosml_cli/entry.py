"""Entry point of the ``agogosml`` command.

It imports the command-line interface inside a handler of Ctrl-C: importing
it takes about a second, and a Ctrl-C then would otherwise end the command
with a traceback.
"""

from __future__ import annotations

import signal
import sys

#: Top-level modules of the packages of the ``cli`` extra.
CLI_EXTRA_MODULES = frozenset(
    {"azure", "click", "copier", "docker", "packaging", "rich", "yaml"}
)


def main() -> None:
    """Run the ``agogosml`` command; exit with 130 on a Ctrl-C during start-up.

    Without the packages of the ``cli`` extra, which a model app's
    environment does not need, it exits with 2 and prints the command that
    installs them.
    """
    try:
        from agogosml_cli.main import cli
    except KeyboardInterrupt:
        print("\nInterrupted by SIGINT.", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)
    except ModuleNotFoundError as exc:
        top = (exc.name or "").partition(".")[0]
        if top not in CLI_EXTRA_MODULES:
            raise
        from agogosml.extras import install_command

        print(
            f"agogosml: the agogosml command needs the packages of agogosml's cli "
            f"extra, and {exc.name!r} is not installed; install them with "
            f"{install_command('cli')}",
            file=sys.stderr,
        )
        sys.exit(2)
    cli()


if __name__ == "__main__":
    main()
