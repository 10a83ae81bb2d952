"""One module per CLI command, each exporting ``command``: parse, call the library, render."""
