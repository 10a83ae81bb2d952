"""bpftrace scripts and BCC programs loaded by leakhunt.trace (shipped as package data)."""
