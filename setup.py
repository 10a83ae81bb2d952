"""Package layout that pyproject.toml cannot express: top-level probes/, gdb_scripts/ and
fixtures/refserver ship inside the wheel under the package names leakhunt.resources resolves."""

from setuptools import Extension, find_packages, setup

MAPPED = {
    "leakhunt._probes": "probes",
    "leakhunt._gdb_scripts": "gdb_scripts",
    "refserver": "fixtures/refserver",
}

packages = find_packages(include=["leakhunt", "leakhunt.*"]) + ["leakhunt._probes", "leakhunt._gdb_scripts"]
packages += ["refserver"] + [f"refserver.{p}" for p in find_packages("fixtures/refserver")]

# The smaps parser's hot path. Optional: without a compiler leakhunt falls back to its
# line-by-line parser (correct, several times slower on big processes).
smaps_ext = Extension(
    "leakhunt.proc._smaps", ["leakhunt/proc/_smaps.c"], optional=True, extra_compile_args=["-O2", "-std=c99"]
)

# The ledger's hot path (a batch of mmap-family calls applied in one call). Optional too: the
# Python reference in leakhunt.trace.ledger does the same, some twenty times slower.
ledger_ext = Extension(
    "leakhunt.trace._ledger",
    ["leakhunt/trace/_ledger.c"],
    optional=True,
    extra_compile_args=["-O2", "-std=c99"],
)

setup(packages=packages, package_dir=MAPPED, ext_modules=[smaps_ext, ledger_ext])
