"""The entry point (the `leakhunt` script and `python -m leakhunt`): starts the read-ahead of what
the command will read (leakhunt.prefetch) before the command's imports, then runs the CLI.

A one-shot read of a live process (`maps --pid`, the command prefetch reads ahead for) holds
nothing that needs finalizing: no recording, no tracer, no child process, no temporary file. It
skips the interpreter's teardown, which frees every module and object one by one (about 35 ms
after a 50k-mapping snapshot, a tenth of the whole command), by flushing its output and leaving
with os._exit. Every other command exits the ordinary way, its atexit handlers and finalizers run.
"""

import os
import sys

from leakhunt import prefetch


def main() -> None:
    one_shot = prefetch.start(sys.argv)
    from leakhunt.cli import main as cli_main

    if not one_shot:
        cli_main()
        return
    try:
        cli_main()
        code = 0
    except SystemExit as e:  # cli_main exits with an int, or None for 0
        code = e.code if isinstance(e.code, int) else 0
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BrokenPipeError:  # a reader that stopped early (| head): as cli_main treats it
        pass
    os._exit(code)


if __name__ == "__main__":
    main()
