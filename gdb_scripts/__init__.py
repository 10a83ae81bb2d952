"""gdb command files and gdb-python helpers loaded by leakhunt.gdb (shipped as package data)."""
