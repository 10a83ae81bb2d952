"""Tracing the target's memory syscalls: the event model, the outstanding-mapping ledger,
symbolization, and the backends (bpftrace, BCC, gdb) that produce events."""
