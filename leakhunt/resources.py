"""The one place that knows where probes/ and gdb_scripts/ are, in a checkout and in a wheel."""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def _package_dir(package: str) -> Path:
    # Both an editable install (mapped package dirs) and a wheel resolve through importlib.
    return Path(str(resources.files(package)))


def probes_dir() -> Path:
    return _package_dir("leakhunt._probes")


def gdb_scripts_dir() -> Path:
    return _package_dir("leakhunt._gdb_scripts")


def probe(name: str) -> Path:
    """Path of one probe file (e.g. 'mmap.bt'); raises FileNotFoundError with the place looked in."""
    path = probes_dir() / name
    if not path.is_file():
        raise FileNotFoundError(f"probe {name!r} not found in {probes_dir()}")
    return path


def gdb_script(name: str) -> Path:
    path = gdb_scripts_dir() / name
    if not path.is_file():
        raise FileNotFoundError(f"gdb script {name!r} not found in {gdb_scripts_dir()}")
    return path
