"""Package layout that pyproject.toml cannot express: top-level probes/, gdb_scripts/ and
fixtures/refserver ship inside the wheel under the package names leakhunt.resources resolves."""
from setuptools import find_packages, setup

MAPPED = {
    "leakhunt._probes": "probes",
    "leakhunt._gdb_scripts": "gdb_scripts",
    "refserver": "fixtures/refserver",
}

packages = find_packages(include=["leakhunt", "leakhunt.*"]) + ["leakhunt._probes", "leakhunt._gdb_scripts"]
packages += ["refserver"] + [f"refserver.{p}" for p in find_packages("fixtures/refserver")]

setup(packages=packages, package_dir=MAPPED)
