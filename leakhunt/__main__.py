"""The entry point (the `leakhunt` script and `python -m leakhunt`): starts the read-ahead of what
the command will read (leakhunt.prefetch) before the command's imports, then runs the CLI."""

import sys

from leakhunt import prefetch


def main() -> None:
    prefetch.start(sys.argv)
    from leakhunt.cli import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()
