"""GDB automation: a pygdbmi-parsed MI session that attaches to a live process in non-stop mode,
breaks on the memory syscalls, takes full symbolized stacks and returned addresses, and always
detaches (leakhunt.gdb.session is the entry point; leakhunt.gdb.backend wraps it)."""
